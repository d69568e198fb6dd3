"""Trajectory predictors and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from nextoffline.errors import UsageError
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor
from nextoffline.ops.predictors.next import NextOptions, NextPredictor
from nextoffline.ops.predictors.trajectory import (
    TrajectoryRank1,
    TrajectoryRank1Predictor,
    direction_component,
    gram_cache_bytes,
    shared_trajectory_gram,
    trajectory_energy,
    trajectory_rank1,
)

__all__ = [
    "PREDICTORS",
    "FactoredUpdate",
    "NextOptions",
    "Predictor",
    "PredictorOptions",
    "TrajectoryRank1",
    "auto_candidates",
    "direction_component",
    "gram_cache_bytes",
    "make_predictor",
    "parse_predictor_name",
    "shared_trajectory_gram",
    "trajectory_energy",
    "trajectory_rank1",
]

PredictorFactory = Callable[..., Predictor]


@dataclass(frozen=True)
class PredictorOptions:
    """Predictor hyperparameters shared by every phase.

    Attributes:
        horizon: checkpoints ahead a learned predictor (NExt) targets, and one coefficient unit
            (``None``: the pipeline's default for the trajectory's length).
        next: NExt training options.
    """

    horizon: int | None = None
    next: NextOptions = field(default_factory=NextOptions)


#: name -> factory(window=None, horizon=h, next_options=NextOptions())
PREDICTORS: dict[str, PredictorFactory] = {
    "linear": lambda window=None, **_: TrajectoryRank1Predictor("linear", window),
    "power": lambda window=None, **_: TrajectoryRank1Predictor("power", window),
    "poly": lambda window=None, **_: TrajectoryRank1Predictor("poly", window),
    "gp": lambda window=None, **_: TrajectoryRank1Predictor("gp", window),
    "next": lambda window=None, horizon=1, next_options=None, **_: NextPredictor(horizon=horizon, **asdict(next_options or NextOptions())),
}


def parse_predictor_name(spec: str) -> tuple[str, int | None]:
    """``"linear@4"`` -> ``("linear", 4)``; ``"next"`` -> ``("next", None)``."""
    name, _, window = spec.partition("@")
    if name not in PREDICTORS:
        raise UsageError(f"unknown method {name!r}; use auto or one of: {', '.join(PREDICTORS)}")
    if window and (not window.isdigit() or int(window) < 3):
        raise UsageError(f"method {spec!r}: the window after @ must be an integer >= 3")
    return name, int(window) if window else None


def make_predictor(spec: str, *, horizon: int, next_options: NextOptions | None = None) -> Predictor:
    """A fresh predictor from ``name[@window]``."""
    name, window = parse_predictor_name(spec)
    return PREDICTORS[name](window=window, horizon=horizon, next_options=next_options)


def auto_candidates(num_observed: int, *, include_next: bool = True) -> list[str]:
    """Predictors (and windows) the ``auto`` method backtests for a prefix of ``num_observed`` steps."""
    windows = sorted({w for w in (3, 5) if w < num_observed})
    names = [f"{kind}@{w}" for kind in ("linear", "power") for w in windows]
    names += ["linear", "power", "poly", "gp"]
    if include_next:
        names.append("next")
    return names
