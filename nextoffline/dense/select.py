"""Full-parameter trajectories: backtests and the choice of predictor, on the statistics of
:func:`~nextoffline.dense.pipeline.collect_stats` (the temporal Grams, and NExt's triplets).

Trends (RELEX-style) need only the Grams: a backtest or a sweep of targets is Gram arithmetic.
NExt (:mod:`nextoffline.dense.next`) trains on the triplet series and is scored exactly by one
streamed pass of matrix-vector products. :func:`select_predictor` resolves the targets, runs
``auto``'s backtest, and returns one :class:`DenseCandidate` per target for the write pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nextoffline.artifacts import candidate_label
from nextoffline.dense.layout import DenseTrajectory
from nextoffline.dense.pipeline import DenseStats
from nextoffline.errors import NotEnoughCheckpointsError, UsageError
from nextoffline.ops.dense import holdout_errors, safe_ratio, trend_weights
from nextoffline.ops.predictors import parse_predictor_name
from nextoffline.ops.regressors import REGRESSORS
from nextoffline.pipeline import AUTO_MAX_ERROR, BacktestResult, check_holdout, default_horizon, horizon_steps, resolve_targets

if TYPE_CHECKING:
    from nextoffline.dense.next import DenseNext

__all__ = [
    "DenseCandidate",
    "DenseChoice",
    "check_method",
    "dense_auto_candidates",
    "dense_backtest",
    "next_in_auto",
    "select_predictor",
]

LOG = logging.getLogger(__name__)


def dense_auto_candidates(num_observed: int, *, with_next: bool = False) -> list[str]:
    """The trajectory predictors ``auto`` backtests on dense deltas (``with_next``: NExt too, when
    its projected training time fits ``--next-budget``, see :func:`next_in_auto`).

    ``gp`` (one scikit-learn Gaussian process per tensor, ~1 s each on a CI core, so minutes for a
    few hundred tensors) is left out and can be asked for by name.
    """
    windows = sorted({w for w in (3, 5) if w < num_observed})
    trends = [f"{kind}@{w}" for kind in ("linear", "power") for w in windows] + ["linear", "power", "poly"]
    return [*trends, "next"] if with_next else trends


def next_in_auto(trajectory: DenseTrajectory, ctx: DenseNext, *, holdout: int, horizon: int) -> tuple[bool, str]:
    """Whether ``auto`` includes NExt: its fits (backtest and final) are projected, from the shapes
    alone, to train within ``--next-budget`` (the LoRA rule); else the reason."""
    from nextoffline.dense.next import next_projected_seconds

    k = len(trajectory.checkpoints)
    shapes = [e.shape for key, e in trajectory.latest.entries.items() if len(e.shape) == 2 and e.dtype.is_floating_point]
    if not shapes or k - holdout < horizon + 2:
        return False, ""
    seconds = next_projected_seconds(shapes, [k - holdout, k], horizon, ctx.options, ctx.device)  # type: ignore[arg-type]
    if seconds <= ctx.budget_s:
        return True, ""
    note = (
        f"auto skipped next: its 2 fits ({ctx.options.epochs} epochs each) are projected to take ~{seconds:.0f} s on {ctx.device}, "
        f"over the {ctx.budget_s:g} s budget (--next-budget); --method next runs it"
    )
    return False, note


def check_method(spec: str) -> tuple[str, int | None]:
    """The trend regressor and window of a full-parameter ``--method``; a one-line error for others."""
    name, window, axis = parse_predictor_name(spec)
    if name not in REGRESSORS:
        raise UsageError(
            f"--method {spec}: full-parameter runs take next or the trends {', '.join(REGRESSORS)} (NAME[@W]); {name} is LoRA-only"
        )
    if axis != "step":
        raise UsageError(f"--method {spec}: full-parameter trends run on the step axis only; drop ':{axis}'")
    return name, window


def _trend_errors(stats: DenseStats, steps: list[float], spec: str, holdout: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Per held-out step, the summed squared errors of a trend fitted on the prefix and of stopping (or why not)."""
    k = len(steps)
    prefix = list(range(k - holdout))
    regressor, window = check_method(spec)
    if window is not None and window > len(prefix):
        return f"window {window} is longer than the {len(prefix)} observed checkpoints"
    err_sum = torch.zeros(holdout, dtype=torch.float64)
    base_sum = torch.zeros(holdout, dtype=torch.float64)
    for j, t in enumerate(range(k - holdout, k)):
        weights = trend_weights(stats.grams, steps, prefix, regressor=regressor, window=window, target_step=steps[t])
        err, base = holdout_errors(stats.grams, weights, prefix[-1], t)
        err_sum[j], base_sum[j] = err.sum(), base.sum()
    return err_sum, base_sum


def dense_backtest(
    trajectory: DenseTrajectory,
    stats: DenseStats,
    methods: Sequence[str],
    *,
    holdout: int = 2,
    next_ctx: DenseNext | None = None,
    horizon: int | None = None,
) -> BacktestResult:
    """Fit each method on a prefix and score the held-out tail (1.0 = no better than stopping).

    ``next`` needs ``next_ctx`` and the triplets of the statistics pass (``stats.features``).

    Raises:
        NotEnoughCheckpointsError: fewer than 3 checkpoints would remain to fit on.
    """
    k = len(trajectory.checkpoints)
    check_holdout(trajectory.source_label, k, holdout)
    steps = [float(s) for s in trajectory.step_numbers]
    errors: dict[str, float] = {}
    per_step: dict[str, list[float]] = {}
    failures: dict[str, str] = {}
    for spec in methods:
        if parse_predictor_name(spec)[0] == "next":
            if next_ctx is None or not stats.features:
                failures[spec] = "no triplets: the statistics pass ran without NExt, or no 2-D tensor fits --chunk-mb"
                continue
            try:
                errors[spec], per_step[spec] = _next_error(trajectory, stats, holdout, horizon or default_horizon(k), next_ctx)
            except NotEnoughCheckpointsError as exc:
                failures[spec] = str(exc)
            continue
        result = _trend_errors(stats, steps, spec, holdout)
        if isinstance(result, str):
            failures[spec] = result
            continue
        err_sum, base_sum = result
        errors[spec] = safe_ratio(float(err_sum.sum()), float(base_sum.sum()))
        per_step[spec] = [safe_ratio(float(err_sum[j]), float(base_sum[j])) for j in range(holdout)]
    observed = trajectory.step_numbers
    return BacktestResult(holdout, observed[: k - holdout], observed[k - holdout :], errors, per_step, failures)


def _next_error(trajectory: DenseTrajectory, stats: DenseStats, holdout: int, horizon: int, ctx: DenseNext) -> tuple[float, list[float]]:
    from nextoffline.dense.next import next_error

    return next_error(trajectory, stats, holdout, horizon, ctx)


@dataclass
class DenseCandidate:
    """One requested target: its step, coefficient, the weights over steps of its update, and
    (NExt) a rank-1 update per 2-D tensor."""

    target_step: float
    coef: float
    by_step: bool
    weights: torch.Tensor  # (N, K) float64, rows in DenseStats.keys order
    rank1: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Folder name of this candidate (the LoRA sweep's names: ``coef_C`` or ``step_N``)."""
        return candidate_label(self.coef, self.target_step, by_step=self.by_step)


@dataclass
class DenseChoice:
    """The predictor used (``None``: keep the latest weights), one candidate per target, and why."""

    method: str | None
    candidates: list[DenseCandidate]
    horizon: int
    horizon_steps: float
    backtest: BacktestResult | None
    note: str
    details: dict[str, Any] = field(default_factory=dict)  # NExt: tensors modelled, fallback trend


def select_predictor(
    trajectory: DenseTrajectory,
    stats: DenseStats,
    *,
    method: str = "auto",
    coefs: Sequence[float] = (),
    to_steps: Sequence[float] = (),
    holdout: int = 2,
    horizon: int | None = None,
    next_ctx: DenseNext | None = None,
) -> DenseChoice:
    """Resolve the targets, run the ``auto`` backtest when asked, and fit the chosen predictor on all
    steps for every target (a sweep costs Gram arithmetic only, or one NExt fit; the files are read once).

    ``auto`` backtests NExt too when ``stats`` holds its triplets (see :func:`next_in_auto`).
    """
    k = len(trajectory.checkpoints)
    horizon = horizon or default_horizon(k)
    targets = resolve_targets(trajectory, horizon=horizon, coefs=coefs, to_steps=to_steps)  # type: ignore[arg-type]
    labels = [candidate_label(t.coef, t.step, by_step=t.by_step) for t in targets]
    if len(set(labels)) != len(labels):
        raise UsageError(f"candidates {labels} share a name; give each coefficient/step once")
    span = horizon_steps(trajectory, horizon)  # type: ignore[arg-type]
    report, note = None, ""
    if method == "auto":
        names = dense_auto_candidates(k - holdout, with_next=bool(stats.features) and next_ctx is not None)
        report = dense_backtest(trajectory, stats, names, holdout=holdout, next_ctx=next_ctx, horizon=horizon)
        best, error = report.best()
        if best is None:
            note = (
                f"no predictor beat stopping at the last checkpoint in the backtest (best error >= {AUTO_MAX_ERROR}): "
                "the latest weights are kept unchanged"
            )
            zero = torch.zeros(len(stats.keys), k, dtype=torch.float64)
            return DenseChoice(None, [DenseCandidate(t.step, t.coef, t.by_step, zero) for t in targets], horizon, span, report, note)
        method, note = best, f"auto selected {best} (backtest error {error:.3f} vs 1.0 for stopping)"
    if parse_predictor_name(method)[0] == "next":
        return _next_choice(trajectory, stats, targets, horizon, span, report, note, holdout, next_ctx)
    regressor, window = check_method(method)
    if window is not None and window > k:
        raise NotEnoughCheckpointsError(f"--method {method}: the window is longer than the {k} checkpoints")
    steps = [float(s) for s in trajectory.step_numbers]
    candidates = [
        DenseCandidate(
            t.step,
            t.coef,
            t.by_step,
            trend_weights(stats.grams, steps, list(range(k)), regressor=regressor, window=window, target_step=t.step),
        )
        for t in targets
    ]
    return DenseChoice(method, candidates, horizon, span, report, note)


def _next_choice(
    trajectory: DenseTrajectory,
    stats: DenseStats,
    targets: Sequence[Any],
    horizon: int,
    span: float,
    report: BacktestResult | None,
    note: str,
    holdout: int,
    next_ctx: DenseNext | None,
) -> DenseChoice:
    """NExt's candidates: its rank-1 update on the 2-D tensors it models, the fallback trend elsewhere."""
    from nextoffline.dense.next import next_candidates

    if next_ctx is None or not stats.features:
        raise UsageError("--method next: no 2-D tensor fits the --chunk-mb budget for its triplets; raise --chunk-mb or use a trend")
    parts, details = next_candidates(trajectory, stats, targets, horizon=horizon, holdout=holdout, ctx=next_ctx)
    candidates = [DenseCandidate(t.step, t.coef, t.by_step, weights, rank1) for t, (weights, rank1) in zip(targets, parts)]
    told = (
        f"next models {details['tensors']} 2-D tensors; the other {details['fallback_tensors']} "
        f"({details['fallback_1d']} not 2-D, {details['fallback_over_budget']} over --chunk-mb) follow {details['fallback_trend']}"
    )
    return DenseChoice("next", candidates, horizon, span, report, f"{note}; {told}" if note else told, details)
