"""NExt on full-parameter (dense) deltas: the LoRA path's triplet networks on every 2-D tensor.

The statistics pass (:func:`~nextoffline.dense.pipeline.collect_stats` with ``next_horizon``)
gives, per 2-D tensor, the sign-aligned top triplets of the global deltas ``g_t``, the local
deltas ``g_t - g_{t-1}`` and the targets ``g_{t+h} - g_t``
(:class:`~nextoffline.ops.dense.TripletSeries`). :class:`~nextoffline.ops.predictors.next.NextPredictor`
trains on them unchanged (one network per vector length, as for LoRA) and predicts the update
triplet ``(sigma, u, v)`` from the last step; the candidate at ``target_step`` is
``W_last + c sigma u v^T`` with ``c`` the number of horizons to the target (NExt's predict-extend).
1-D tensors and 2-D tensors over the budget follow a RELEX trend (the best of the trend backtest,
or none: kept) and the manifest says how many.

Rank 0 trains and broadcasts the predicted triplets (small), so every rank writes the same
values. The backtest scores NExt exactly: with ``D = c sigma u v^T``, ``|D - (g_t - g_p)|^2 =
c^2 sigma^2 - 2 c sigma u^T (g_t - g_p) v + |g_t - g_p|^2``; the bilinear forms need one
streamed pass of matrix-vector products over the held-out checkpoints, the rest is the Gram.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nextoffline.dense.dist import Group
from nextoffline.dense.layout import DenseTrajectory
from nextoffline.dense.pipeline import DenseStats, _threads, _Workspace, owned_keys
from nextoffline.dense.stream import FileHandles, read_into, slab_bounds
from nextoffline.errors import NotEnoughCheckpointsError, UsageError
from nextoffline.ops.dense import truncated_features
from nextoffline.ops.predictors import NextOptions
from nextoffline.ops.predictors.next import NextPredictor, projected_fit_seconds

__all__ = ["DenseNext", "NextFit", "fit_next", "next_backtest_sums", "next_projected_seconds"]

LOG = logging.getLogger(__name__)

_F64 = torch.float64


@dataclass(frozen=True)
class DenseNext:
    """How NExt runs on a full-parameter trajectory: the job's group, compute device, read budget,
    training options, and the ``--next-budget`` under which ``auto`` includes it."""

    group: Group = field(default_factory=Group)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    budget: int = 64 << 20
    options: NextOptions = field(default_factory=NextOptions)
    budget_s: float = 120.0


@dataclass
class NextFit:
    """The predicted update triplet of every modelled tensor and the step scale of one horizon."""

    triplets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # key -> sigma (), u (m,), v (n,)
    last_step: float
    span: float
    settings: dict[str, Any]

    def coefficient(self, step: float) -> float:
        """Horizons from the last observed step to ``step`` (NExt's coefficient)."""
        return (step - self.last_step) / self.span if self.span else 0.0

    def rank1(self, step: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per tensor, the update ``outer(left, right)`` that reaches ``step``."""
        c = self.coefficient(step)
        return {key: (c * sigma * u, v) for key, (sigma, u, v) in self.triplets.items()}


def next_projected_seconds(
    shapes: Sequence[tuple[int, int]], fits: Sequence[int], horizon: int, options: NextOptions, device: torch.device
) -> float:
    """Projected training time of NExt fits on ``fits`` observed checkpoints each, from the 2-D shapes alone."""
    rows: dict[tuple[str, int], int] = {}
    for m, n in shapes:
        for kind, dim in (("u", m), ("v", n), ("sigma", 1)):
            rows[(kind, dim)] = rows.get((kind, dim), 0) + 1
    total = 0.0
    for observed in fits:
        groups = [(dim, count, max(observed - horizon, 0)) for (_kind, dim), count in rows.items()]
        total += projected_fit_seconds(groups, epochs=options.epochs, hidden=options.hidden, device=device)
    return total


def fit_next(stats: DenseStats, steps: Sequence[float], observed: int, horizon: int, ctx: DenseNext) -> NextFit:
    """Train NExt on the first ``observed`` checkpoints (rank 0; every rank gets the result).

    Raises:
        UsageError: no 2-D tensor has triplets (all 1-D or over the budget).
        NotEnoughCheckpointsError: fewer than ``horizon + 2`` observed checkpoints (no target to learn).
    """

    def train() -> NextFit:
        if not stats.features:
            raise UsageError("--method next: no 2-D tensor fits the --chunk-mb budget for its triplets; raise --chunk-mb or use a trend")
        if observed < horizon + 2:
            raise NotEnoughCheckpointsError(
                f"next needs at least {horizon + 2} checkpoints for horizon {horizon}, got {observed}; lower --horizon or use a trend"
            )
        o = ctx.options
        predictor = NextPredictor(horizon, epochs=o.epochs, lr=o.lr, hidden=o.hidden, loss=o.loss, seed=o.seed, device=ctx.device)
        values = torch.tensor([float(s) for s in steps[:observed]], dtype=_F64)
        for key in sorted(stats.features):
            features = stats.features[key]
            if observed < len(features.global_):
                features = truncated_features(features, observed, horizon)
            predictor.observe_features((key,), features, values)
        predictor.fit()
        triplets = {key: tuple(x[0].cpu() for x in predictor.predicted_triplet((key,))) for key in sorted(stats.features)}
        return NextFit(triplets, float(steps[observed - 1]), predictor.horizon_steps, predictor.settings())  # type: ignore[arg-type]

    return ctx.group.main_first(train)


def _bilinear_forms(trajectory: DenseTrajectory, fit: NextFit, indices: Sequence[int], ctx: DenseNext) -> dict[str, torch.Tensor]:
    """``u^T g_j v`` (float64) of every modelled tensor at each checkpoint index ``j``: one streamed
    pass of matrix-vector products over this rank's tensors, gathered on every rank."""
    mine = [key for key in owned_keys(trajectory, ctx.group) if key in fit.triplets]
    work = _Workspace(ctx.device)
    local: dict[str, torch.Tensor] = {}
    with _threads(ctx.device), FileHandles() as handles:
        for key in mine:
            entry = trajectory.latest.entries[key]
            _sigma, u, v = (x.to(ctx.device, torch.float32) for x in fit.triplets[key])
            cols = entry.shape[1]
            sums = torch.zeros(len(indices), dtype=_F64)
            for start, stop in slab_bounds(entry, 2, ctx.budget):
                size = stop - start
                raw = work.raw(size)
                ref = read_into(handles, trajectory.reference, key, start, stop, work.f32("bl-ref", 1, size)[0], raw)
                rows = u[start // cols : stop // cols]
                for j, index in enumerate(indices):
                    delta = read_into(handles, trajectory.checkpoints[index], key, start, stop, work.f32("bl-d", 1, size)[0], raw)
                    sums[j] += float((rows.double() @ (delta.sub_(ref).view(-1, cols) @ v).double()).cpu())
            local[key] = sums
    merged: dict[str, torch.Tensor] = {}
    for part in ctx.group.all_gather(local):
        merged.update(part)
    return merged


def next_backtest_sums(
    trajectory: DenseTrajectory, stats: DenseStats, holdout: int, horizon: int, ctx: DenseNext
) -> tuple[torch.Tensor, torch.Tensor, NextFit]:
    """NExt fitted on all but the last ``holdout`` checkpoints: per held-out step, the squared error
    of its prediction summed over the modelled tensors and the same for stopping (float64 ``(holdout,)``)."""
    k = len(trajectory.checkpoints)
    steps = [float(s) for s in trajectory.step_numbers]
    last = k - holdout - 1
    fit = fit_next(stats, steps, k - holdout, horizon, ctx)
    heldout = list(range(k - holdout, k))
    forms = _bilinear_forms(trajectory, fit, [last, *heldout], ctx)
    row = {key: i for i, key in enumerate(stats.keys)}
    err = torch.zeros(holdout, dtype=_F64)
    base = torch.zeros(holdout, dtype=_F64)
    for key, (sigma, _u, _v) in fit.triplets.items():
        gram = stats.grams[row[key]]
        s = float(sigma)
        for j, t in enumerate(heldout):
            c = fit.coefficient(steps[t])
            truth = float(gram[t, t] - 2 * gram[t, last] + gram[last, last])
            err[j] += max(c * c * s * s - 2 * c * s * float(forms[key][j + 1] - forms[key][0]) + truth, 0.0)
            base[j] += max(truth, 0.0)
    return err, base, fit


def fallback_trend(trajectory: DenseTrajectory, stats: DenseStats, holdout: int) -> str | None:
    """The trend the tensors NExt does not model follow: the best of the trend backtest (``None``:
    none beats stopping, they keep the latest weights)."""
    from nextoffline.dense.select import dense_auto_candidates, dense_backtest

    k = len(trajectory.checkpoints)
    if k - holdout < 3:
        return None
    return dense_backtest(trajectory, stats, dense_auto_candidates(k - holdout), holdout=holdout).best()[0]


def fallback_weights(stats: DenseStats, steps: Sequence[float], observed: int, trend: str | None, target_step: float) -> torch.Tensor:
    """Trend weights ``(N, K)`` of the tensors NExt does not model (zero rows for the modelled ones)."""
    from nextoffline.dense.select import check_method
    from nextoffline.ops.dense import trend_weights

    k = stats.grams.shape[-1]
    weights = torch.zeros(len(stats.keys), k, dtype=_F64)
    if trend is None:
        return weights
    regressor, window = check_method(trend)
    if window is not None and window > observed:
        return weights
    weights = trend_weights(stats.grams, steps, list(range(observed)), regressor=regressor, window=window, target_step=target_step)
    for i, key in enumerate(stats.keys):
        if key in stats.features:
            weights[i] = 0
    return weights


def next_error(trajectory: DenseTrajectory, stats: DenseStats, holdout: int, horizon: int, ctx: DenseNext) -> tuple[float, list[float]]:
    """NExt's backtest error over the whole model (the fallback trend on the tensors it does not
    model), as a ratio to stopping: total and per held-out step."""
    from nextoffline.ops.dense import holdout_errors, safe_ratio

    k = len(trajectory.checkpoints)
    steps = [float(s) for s in trajectory.step_numbers]
    err, base, _fit = next_backtest_sums(trajectory, stats, holdout, horizon, ctx)
    trend = fallback_trend(trajectory, stats, holdout)
    rest = [i for i, key in enumerate(stats.keys) if key not in stats.features]
    for j, t in enumerate(range(k - holdout, k)):
        weights = fallback_weights(stats, steps, k - holdout, trend, steps[t])
        e, b = holdout_errors(stats.grams[rest], weights[rest], k - holdout - 1, t)
        err[j] += e.sum()
        base[j] += b.sum()
    return safe_ratio(float(err.sum()), float(base.sum())), [safe_ratio(float(err[j]), float(base[j])) for j in range(holdout)]


def next_candidates(
    trajectory: DenseTrajectory, stats: DenseStats, targets: Sequence[Any], *, horizon: int, holdout: int, ctx: DenseNext
) -> tuple[list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]], dict[str, Any]]:
    """Per target (``step`` attribute): the fallback trend's weights and NExt's rank-1 updates, and
    what the manifest records (tensors modelled, the fallback and its tensors)."""
    k = len(trajectory.checkpoints)
    steps = [float(s) for s in trajectory.step_numbers]
    fit = fit_next(stats, steps, k, horizon, ctx)
    trend = fallback_trend(trajectory, stats, holdout)
    parts = [(fallback_weights(stats, steps, k, trend, t.step), fit.rank1(t.step)) for t in targets]
    one_dim = sum(1 for key in stats.keys if len(trajectory.latest.entries[key].shape) != 2)
    details = {
        "predictor_settings": fit.settings,
        "tensors": len(fit.triplets),
        "fallback_trend": trend or "none (latest weights kept)",
        "fallback_tensors": len(stats.keys) - len(fit.triplets),
        "fallback_1d": one_dim,
        "fallback_over_budget": len(stats.next_skipped),
    }
    return parts, details
