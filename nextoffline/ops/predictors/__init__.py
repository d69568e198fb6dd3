"""Trajectory predictors and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from nextoffline.errors import UsageError
from nextoffline.ops.forecast import TIME_AXES, TimeAxis
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor
from nextoffline.ops.predictors.baselines import AlphaRLPredictor, AveragePredictor, ExpoPredictor
from nextoffline.ops.predictors.next import NextOptions, NextPredictor
from nextoffline.ops.predictors.trajectory import (
    TrajectoryRank1,
    TrajectoryRank1Predictor,
    TrajectoryRankKPredictor,
    direction_component,
    gram_cache_bytes,
    shared_trajectory_gram,
    trajectory_energy,
    trajectory_rank1,
)
from nextoffline.ops.predictors.wrappers import OnTimeAxis

__all__ = [
    "AXIS_FREE",
    "DENOISERS",
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
    "log": lambda window=None, **_: TrajectoryRank1Predictor("log", window),
    "sat": lambda window=None, **_: TrajectoryRank1Predictor("sat", window),
    "poly": lambda window=None, **_: TrajectoryRank1Predictor("poly", window),
    "gp": lambda window=None, **_: TrajectoryRank1Predictor("gp", window),
    "rotate": lambda window=None, **_: TrajectoryRankKPredictor("linear", window),
    "rotate-sat": lambda window=None, **_: TrajectoryRankKPredictor("sat", window, label="rotate-sat"),
    "expo": lambda window=None, **_: ExpoPredictor(),
    "lawa": lambda window=None, **_: AveragePredictor("lawa", window),
    "ema": lambda window=None, **_: AveragePredictor("ema", window),
    "alpharl": lambda window=None, **_: AlphaRLPredictor(),
    "next": lambda window=None, horizon=1, next_options=None, **_: NextPredictor(horizon=horizon, **asdict(next_options or NextOptions())),
}

#: Predictors that are not trends in time (fitted in checkpoints, or denoisers): step axis only.
AXIS_FREE = frozenset({"next", "lawa", "ema"})
#: Baselines that average past checkpoints: shown in the backtest table, never selected by ``auto``
#: (they move the weights back toward earlier checkpoints, which is not an extrapolation).
DENOISERS = frozenset({"lawa", "ema"})
_NO_WINDOW = frozenset({"next", "expo", "alpharl"})


def parse_predictor_name(spec: str) -> tuple[str, int | None, str]:
    """``"linear@4:log"`` -> ``("linear", 4, "log")``; ``"next"`` -> ``("next", None, "step")``."""
    body, _, axis = spec.partition(":")
    name, _, window = body.partition("@")
    if name not in PREDICTORS:
        raise UsageError(f"unknown method {name!r}; use auto or one of: {', '.join(PREDICTORS)}")
    if window and (not window.isdigit() or int(window) < (2 if name in ("lawa", "ema") else 3)):
        raise UsageError(f"method {spec!r}: the window after @ must be an integer >= 3 (>= 2 for lawa, ema)")
    if window and name in _NO_WINDOW:
        raise UsageError(f"method {spec!r}: {name} takes no window")
    axis = axis or "step"
    if axis not in TIME_AXES:
        raise UsageError(f"method {spec!r}: time axis {axis!r}; use one of {', '.join(TIME_AXES)} after ':'")
    if axis != "step" and name in AXIS_FREE:
        raise UsageError(f"method {spec!r}: {name} is not a trend in time; drop ':{axis}'")
    return name, int(window) if window else None, axis


def make_predictor(
    spec: str, *, horizon: int, next_options: NextOptions | None = None, axes: dict[str, TimeAxis] | None = None
) -> Predictor:
    """A fresh predictor from ``name[@window][:axis]`` (``axes``: the trajectory's time axes by kind)."""
    name, window, axis = parse_predictor_name(spec)
    predictor = PREDICTORS[name](window=window, horizon=horizon, next_options=next_options)
    if axis == "step":
        return predictor
    if axes is None or axis not in axes:
        raise UsageError(f"method {spec!r}: the {axis} time axis is not available for this run (no learning rates were logged)")
    return OnTimeAxis(predictor, axes[axis], spec)


def auto_candidates(num_observed: int, *, include_next: bool = True, axes: tuple[str, ...] = ("step",)) -> list[str]:
    """Predictors (windows, time axes) the ``auto`` method backtests for a prefix of ``num_observed`` steps.

    Trends (RELEX-style, rank-k, saturating, log) are tried on every time axis in ``axes``; the
    quadratic trend, the baselines and NExt on the step axis only (``gp``, a per-series sklearn
    fit at every origin, only when asked for).
    """
    windows = sorted({w for w in (3, 5) if w < num_observed})
    trends = [f"{kind}@{w}" for kind in ("linear", "power") for w in windows]
    trends += ["linear", "power", "log", "sat", "rotate", "rotate-sat"]
    trends += [f"rotate@{w}" for w in windows if w >= 5]
    names = [t if axis == "step" else f"{t}:{axis}" for axis in axes for t in trends]
    names += ["poly", "expo", "alpharl", "lawa", "ema"]
    if include_next:
        names.append("next")
    return names
