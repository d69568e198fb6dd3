"""Rolling-origin backtests at the requested lead, damping, and the time axes of a run.

Orchestration only (the arithmetic is in :mod:`nextoffline.ops.forecast`): for every candidate
predictor and every origin ``o`` of the backtest, the predictor observes checkpoints ``0..o``
only and predicts the checkpoints the targets' leads reach from ``o``; each (origin, target)
pair is scored by the sums ``|D|^2, <D, T>, |T|^2, |D - T|^2`` over modules (from the chunk's
trajectory Gram where the update is a weighted sum of step updates, else from ``p x r`` factor
products: never a dense ``m x n`` matrix). Damped errors, the damping and the error band of each
target follow from those sums.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nextoffline.errors import NotEnoughCheckpointsError
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.decompose import frobenius_sq
from nextoffline.ops.forecast import (
    TIME_AXES,
    DampedScore,
    PairSums,
    TimeAxis,
    damped_score,
    lead_in_checkpoints,
    origin_grid,
    rolling_origins,
)
from nextoffline.ops.predictors import FactoredUpdate, NextOptions, Predictor, make_predictor
from nextoffline.schedules import logged_learning_rates
from nextoffline.types import Trajectory

__all__ = ["ForecastOptions", "PairScores", "TargetForecast", "available_axes", "next_fit_groups", "plan_targets", "score_pairs"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForecastOptions:
    """How a selection is validated (passed explicitly, next to the compute settings).

    Attributes:
        origins: rolling origins scored per target lead.
        grid: origins shared by all leads (each predictor is fitted once per grid origin).
        min_fit: fewest checkpoints a backtest fit sees.
        time_axes: axes the trends of ``auto`` are tried on (where available: ``lr`` needs
            logged learning rates).
        damping: choose ``a`` in ``[0, 1]`` per target (``last + a (forecast - last)``);
            ``False`` scores and applies forecasts undamped.
        next_budget_s: ``auto`` skips NExt when its projected training time (every backtest
            origin it is scored at, plus the final fit) exceeds this many seconds; ``--method next`` is never skipped.
        learning_rates: ``(step, rate)`` pairs for the ``lr`` axis (``None``: read the run's logs).
    """

    origins: int = 3
    grid: int = 5
    min_fit: int = 3
    time_axes: tuple[str, ...] = TIME_AXES
    damping: bool = True
    next_budget_s: float = 120.0
    learning_rates: tuple[tuple[float, float], ...] | None = None


@dataclass
class TargetForecast:
    """Rolling-origin scores of every candidate at one target's lead."""

    target_step: float
    lead: int
    scored_lead: int
    origins: list[int]  # index of each origin's last fitted checkpoint
    origin_steps: list[int]  # their training steps
    scores: dict[str, DampedScore] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "target_step": self.target_step,
            "lead_checkpoints": self.lead,
            "scored_lead_checkpoints": self.scored_lead,
            "origin_steps": self.origin_steps,
            "scores": {
                name: {
                    "error": s.error,
                    "damped_error": s.damped_error,
                    "damping": s.damping,
                    "band": list(s.band),
                    "per_origin": s.per_origin,
                }
                for name, s in sorted(self.scores.items(), key=lambda kv: kv[1].damped_error)
            },
        }


def available_axes(trajectory: Trajectory, options: ForecastOptions) -> tuple[dict[str, TimeAxis], dict[str, str]]:
    """The run's time axes by kind, and why any requested one is not available."""
    axes: dict[str, TimeAxis] = {"step": TimeAxis("step"), "log": TimeAxis("log")}
    missing: dict[str, str] = {}
    if options.learning_rates is not None:
        points, where = list(options.learning_rates), "given learning rates"
    else:
        points, where = logged_learning_rates(trajectory)
    if points:
        axis = TimeAxis("lr", points)
        values = axis.map(trajectory.step_numbers)
        if all(b > a for a, b in itertools.pairwise(values)):
            axes["lr"] = axis
        else:
            missing["lr"] = f"{where}: the cumulative learning rate does not grow between the checkpoints"
    else:
        missing["lr"] = where
    return axes, missing


def plan_targets(steps: Sequence[float], target_steps: Sequence[float], options: ForecastOptions) -> list[TargetForecast]:
    """One :class:`TargetForecast` (lead, scored lead, origins) per target step."""
    k = len(steps)
    grid = origin_grid(k, min_fit=options.min_fit, size=options.grid)
    plans = []
    for target in target_steps:
        lead = lead_in_checkpoints(steps, target)
        scored, origins = rolling_origins(k, lead, grid, origins=options.origins)
        plans.append(TargetForecast(float(target), lead, scored, [int(o) for o in origins], [int(steps[o]) for o in origins]))
    return plans


@dataclass
class PairScores:
    """``sums[name][(origin, target)]``: the scoring sums of every candidate and pair; ``failures``
    says why a candidate could not be fitted (at some origin)."""

    sums: dict[str, dict[tuple[int, int], PairSums]]
    failures: dict[str, str]

    def merged(self, other: PairScores) -> PairScores:
        return PairScores({**self.sums, **other.sums}, {**self.failures, **other.failures})

    def score(self, name: str, pairs: Sequence[tuple[int, int]], *, damping: bool) -> DampedScore | None:
        have = self.sums.get(name, {})
        if not pairs or any(p not in have for p in pairs):
            return None
        return damped_score([have[p] for p in pairs], damping=damping)


class _Totals:
    """Running float64 sums of one candidate over modules (all chunks)."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, pair: tuple[int, int], sums: torch.Tensor) -> None:
        self.values[pair] = self.values.get(pair, torch.zeros(4, dtype=torch.float64)) + sums

    def result(self) -> dict[tuple[int, int], PairSums]:
        return {pair: PairSums(*(float(x) for x in v)) for pair, v in self.values.items()}


class _Scorer:
    """The four sums of a predicted update against the true update of one (origin, target) pair."""

    def __init__(self, chunk: FactorChunk, gram: torch.Tensor | None) -> None:
        self.chunk, self.gram = chunk, gram

    def sums(self, update: FactoredUpdate, origin: int, target: int) -> torch.Tensor:
        combination = update.step_combination()
        if combination is not None and self.gram is not None:
            return self._quadratic(combination, origin, target)
        dd = update.frobenius_sq().to(torch.float64)
        c = self.chunk
        dt = update.cross_delta(c.b[target], c.a[target], c.b[origin], c.a[origin], c.scaling).to(dd)
        true_left, true_right = c.delta(target, origin)
        if self.gram is not None:
            e = torch.zeros(c.num_steps, dtype=torch.float64, device=self.gram.device)
            e[target], e[origin] = 1.0, -1.0
            tt = torch.einsum("i,nij,j->n", e, self.gram, e).clamp_min(0).to(dd)
        else:
            tt = frobenius_sq(true_left, true_right).to(dd)
        left = torch.cat([update.left.to(true_left), -true_left], dim=-1)
        right = torch.cat([update.right.to(true_right), true_right], dim=-2)
        error = frobenius_sq(left, right).to(dd)
        return torch.stack([dd.sum(), dt.sum(), tt.sum(), error.sum()]).cpu()

    def _quadratic(self, combination: tuple[tuple[int, ...], torch.Tensor], origin: int, target: int) -> torch.Tensor:
        gram = self.gram
        assert gram is not None
        steps, weights = combination
        d = torch.zeros(weights.shape[0], self.chunk.num_steps, dtype=torch.float64, device=gram.device)
        d[:, list(steps)] = weights.to(d)
        t = torch.zeros_like(d)
        t[:, target], t[:, origin] = 1.0, -1.0
        gd, gt = torch.einsum("nij,nj->ni", gram, d), torch.einsum("nij,nj->ni", gram, t)
        diff = d - t
        error = torch.einsum("ni,nij,nj->n", diff, gram, diff).clamp_min(0)
        return torch.stack([(d * gd).sum(), (d * gt).sum(), (t * gt).sum(), error.sum()]).cpu()


ChunkSource = Callable[[str], Iterator[FactorChunk]]


def _horizon_for(settings_horizon: int | None, observed: int) -> int:
    from nextoffline.pipeline import default_horizon

    return settings_horizon or default_horizon(observed)


def score_pairs(
    trajectory: Trajectory,
    methods: Sequence[str],
    pairs: dict[int, set[int]],
    *,
    chunks: ChunkSource,
    trajectory_gram: Callable[[FactorChunk, bool], torch.Tensor | None],
    horizon: int | None,
    next_options: NextOptions | None,
    axes: dict[str, TimeAxis],
    progress: Callable[[list[Any], str], Any] = lambda items, desc: items,
) -> PairScores:
    """Fit every method at every origin of ``pairs`` (``origin -> target indices``) and score it.

    ``chunks(desc)`` streams the trajectory's chunks (one read per pass); ``trajectory_gram(chunk,
    needed)`` returns the float64 trajectory Gram of a chunk as read (or ``None`` over budget).
    """
    origins = sorted(pairs)
    predictors: dict[tuple[str, int], Predictor] = {}
    failures: dict[str, str] = {}
    for name in methods:
        for o in origins:
            predictors[(name, o)] = make_predictor(name, horizon=_horizon_for(horizon, o + 1), next_options=next_options, axes=axes)
    totals = {name: _Totals() for name in methods}
    broken: set[tuple[str, int]] = set()
    for chunk in chunks("backtest"):
        per_chunk_live = any(p.fits_per_chunk for key, p in predictors.items() if key not in broken)
        scorer = _Scorer(chunk, trajectory_gram(chunk, per_chunk_live))
        for o in origins:
            observed = chunk.select_steps(list(range(o + 1)))
            for name in methods:
                key = (name, o)
                if key in broken:
                    continue
                predictor = predictors[key]
                try:
                    predictor.observe(observed)
                except NotEnoughCheckpointsError as exc:
                    failures.setdefault(name, str(exc))
                    broken.add(key)
                    continue
                if predictor.fits_per_chunk:
                    for t in sorted(pairs[o]):
                        totals[name].add((o, t), scorer.sums(predictor.predict_update(observed, float(chunk.steps[t])), o, t))
    group_level = [key for key, p in predictors.items() if not p.fits_per_chunk and key not in broken]
    for key in progress(group_level, "fit"):
        predictors[key].fit()
    if group_level:
        for chunk in chunks("backtest"):
            scorer = _Scorer(chunk, None)
            for name, o in group_level:
                observed = chunk.select_steps(list(range(o + 1)))
                for t in sorted(pairs[o]):
                    update = predictors[(name, o)].predict_update(observed, float(chunk.steps[t]))
                    totals[name].add((o, t), scorer.sums(update, o, t))
    return PairScores({name: totals[name].result() for name in methods}, failures)


def next_fit_groups(trajectory: Trajectory, observed: int, horizon: int) -> list[tuple[int, int, int]]:
    """``(d, rows, samples per row)`` of every NExt network for a fit on ``observed`` checkpoints."""
    rows: dict[tuple[str, int], int] = {}
    for module in trajectory.modules:
        for kind, dim in (("u", module.out_features), ("v", module.in_features), ("sigma", 1)):
            rows[(kind, dim)] = rows.get((kind, dim), 0) + 1
    samples = max(observed - horizon, 0)
    return [(dim, count, samples) for (_kind, dim), count in rows.items()]
