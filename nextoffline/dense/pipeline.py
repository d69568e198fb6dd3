"""Full-parameter trajectories: statistics pass, backtest/selection, slab-wise write.

Two streamed passes over the files, tensor by tensor and slab by slab (peak memory: the chunk
budget plus small per-tensor results, whatever the number of checkpoints or the model size):

1. :func:`collect_stats`: per tensor, the ``K x K`` temporal Gram of the global deltas
   (float64) and, for 16-bit weights, how many elements did not change between consecutive
   checkpoints (updates below the dtype's resolution are lost).
2. :func:`write_extrapolated_model`: ``W_last + sum_i w_i (W_i - W_ref)`` per slab for every
   :class:`WriteJob`, cast to each target's stored dtype and written at its byte offsets (the
   output model folder, and the trainer's own files in a ``--resumable`` copy).

Fitting and selection need only the Grams. Under ``torchrun`` each rank reads the tensors
:func:`~nextoffline.dense.dist.partition` gives it, the Grams are gathered, every rank fits
all tensors identically, and each rank writes its tensors into the shared output files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from nextoffline.artifacts import candidate_label
from nextoffline.dense.dist import Group, partition
from nextoffline.dense.layout import DenseTrajectory, WriteTarget
from nextoffline.dense.stream import FileHandles, read_into, read_slab, slab_bounds, write_slab
from nextoffline.errors import NotEnoughCheckpointsError, NumericalError, UsageError
from nextoffline.loader import BufferPool
from nextoffline.ops.chunk import Rank1Features
from nextoffline.ops.dense import (
    Triplet,
    TripletSeries,
    accumulate_gram,
    align_signs,
    holdout_errors,
    safe_ratio,
    top_triplet,
    trend_weights,
)
from nextoffline.ops.device import single_thread
from nextoffline.ops.predictors import parse_predictor_name
from nextoffline.ops.regressors import REGRESSORS
from nextoffline.pipeline import AUTO_MAX_ERROR, BacktestResult, check_holdout, default_horizon, horizon_steps, resolve_targets

if TYPE_CHECKING:
    from nextoffline.dense.next import DenseNext

__all__ = [
    "DenseCandidate",
    "DenseChoice",
    "DenseStats",
    "Rank1Energy",
    "WriteJob",
    "check_method",
    "collect_stats",
    "dense_auto_candidates",
    "dense_backtest",
    "dense_inspect",
    "next_in_auto",
    "owned_keys",
    "rank1_energy",
    "resolution_warning",
    "select_predictor",
    "write_extrapolated_model",
]

LOG = logging.getLogger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: warn when at least this fraction of 16-bit weights is unchanged between consecutive checkpoints
UNCHANGED_WARN = 0.5


@dataclass
class DenseStats:
    """Per floating-point tensor (canonical order ``keys``): temporal Grams of the global deltas."""

    keys: list[str]
    grams: torch.Tensor  # (N, K, K) float64
    unchanged: torch.Tensor  # (K,) int64: sampled 16-bit elements equal to the previous checkpoint's (index 0 unused)
    low_precision_elements: int  # 16-bit elements sampled (every UNCHANGED_SAMPLE_STRIDE-th)
    #: NExt's triplet series of every 2-D tensor (when asked for with ``next_horizon``)
    features: dict[str, Rank1Features] = field(default_factory=dict)
    #: 2-D tensors whose NExt triplets were not computed: their float32 deltas exceed the budget
    next_skipped: list[str] = field(default_factory=list)


def _float_keys(trajectory: DenseTrajectory) -> list[str]:
    return [k for k in trajectory.keys if trajectory.latest.entries[k].dtype.is_floating_point]


def owned_keys(trajectory: DenseTrajectory, group: Group) -> list[str]:
    """Tensor keys this rank reads and writes (all of them in a single process)."""
    keys = trajectory.keys
    parts = partition([trajectory.latest.entries[k].nbytes for k in keys], group.world)
    return [keys[i] for i in parts[group.rank]]


def _threads(device: torch.device):
    """Streaming passes on CPU run on one intra-op thread per process: they are memory-bound, and an
    OpenMP fork/join per slab operation cost 40x on a loaded 2-core machine (29 ms vs 0.7 ms for a
    1M-element widen). More cores: more processes (``torchrun``)."""
    return single_thread(device)


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


#: the 16-bit "unchanged" fraction is estimated on every this-many-th element (a measured sample)
UNCHANGED_SAMPLE_STRIDE = 16


class _Workspace:
    """Flat buffers reused by every slab (fresh memory per slab costs page faults: ~4x slower on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = BufferPool()

    def raw(self, elements: int) -> torch.Tensor:
        return self.pool.take("raw", (elements * 8,), torch.uint8)

    def f32(self, name: str, rows: int, elements: int) -> torch.Tensor:
        return (
            self.pool.take(f"f32-{name}", (rows, elements), torch.float32)
            if self.device.type == "cpu"
            else self._device(name, rows, elements)
        )

    def f64(self, rows: int, elements: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return self.pool.take("f64", (rows, elements), torch.float64)
        return torch.empty(rows, elements, dtype=torch.float64, device=self.device)

    def _device(self, name: str, rows: int, elements: int) -> torch.Tensor:
        key = f"dev-{name}"
        held = getattr(self, key.replace("-", "_"), None)
        if held is None or held.numel() < rows * elements:
            held = torch.empty(rows * elements, dtype=torch.float32, device=self.device)
            setattr(self, key.replace("-", "_"), held)
        return held[: rows * elements].view(rows, elements)


def _tensor_stats(
    trajectory: DenseTrajectory, handles: FileHandles, key: str, budget: int, work: _Workspace, series: TripletSeries | None = None
):
    """Gram ``(K, K)`` of the global deltas of one tensor and its sampled unchanged-element counts.

    ``series``: a 2-D tensor read in one slab also feeds NExt's triplets from the same read.
    """
    checkpoints, reference = trajectory.checkpoints, trajectory.reference
    k = len(checkpoints)
    gram = torch.zeros(k, k, dtype=torch.float64, device=work.device)
    unchanged = torch.zeros(k, dtype=torch.int64)
    low = trajectory.latest.entries[key].dtype in _LOW_PRECISION
    sampled = 0
    for start, stop in slab_bounds(trajectory.latest.entries[key], k + 1, budget):
        size = stop - start
        raw = work.raw(size)
        ref = read_into(handles, reference, key, start, stop, work.f32("ref", 1, size)[0], raw)
        deltas = work.f32("deltas", k, size)
        for t, checkpoint in enumerate(checkpoints):
            read_into(handles, checkpoint, key, start, stop, deltas[t], raw).sub_(ref)
        accumulate_gram(gram, deltas, scratch=work.f64(k, size))
        if series is not None:
            shape = trajectory.latest.entries[key].shape
            for t in range(k):
                series.add(deltas[t].view(1, *shape))
        if low:
            sample = deltas[:, ::UNCHANGED_SAMPLE_STRIDE]
            unchanged[1:] += (sample[1:] == sample[:-1]).sum(-1).cpu()
            sampled += sample.shape[-1]
    gram = gram.cpu()
    if not bool(torch.isfinite(gram).all()):
        bad = [c.folder for t, c in enumerate(checkpoints) if not bool(torch.isfinite(gram[t, t]))]
        where = bad[0] if len(bad) < k else reference.folder
        raise NumericalError(f"{where}: tensor {key} holds NaN or Inf; drop this checkpoint from the run folder")
    return gram, unchanged, sampled


def _tensor_triplets(trajectory: DenseTrajectory, handles: FileHandles, key: str, series: TripletSeries, work: _Workspace) -> None:
    """NExt's triplets of one 2-D tensor read whole, one checkpoint at a time (its deltas fit the
    budget ``horizon + 3`` times, but not the ``K + 1`` rows of one statistics slab)."""
    entry = trajectory.latest.entries[key]
    raw = work.raw(entry.numel)
    ref = read_into(handles, trajectory.reference, key, 0, entry.numel, work.f32("nx-ref", 1, entry.numel)[0], raw)
    for checkpoint in trajectory.checkpoints:
        delta = read_into(handles, checkpoint, key, 0, entry.numel, work.f32("nx-delta", 1, entry.numel)[0], raw).sub_(ref)
        series.add(delta.view(1, *entry.shape))


def _next_eligible(trajectory: DenseTrajectory, key: str, horizon: int | None, budget: int) -> tuple[bool, bool]:
    """(2-D tensor NExt models, its float32 deltas fit the budget ``horizon + 3`` times)."""
    entry = trajectory.latest.entries[key]
    if horizon is None or len(entry.shape) != 2 or min(entry.shape) == 0:
        return False, False
    return True, (horizon + 3) * entry.numel * 4 <= budget


def collect_stats(
    trajectory: DenseTrajectory,
    device: torch.device,
    budget: int,
    group: Group,
    *,
    progress: bool = False,
    next_horizon: int | None = None,
) -> DenseStats:
    """Pass 1 over the files: Grams of this rank's tensors, gathered so every rank holds all of them.

    With ``next_horizon``: also NExt's triplet series of every 2-D tensor whose float32 deltas fit
    the budget ``next_horizon + 3`` times (from the statistics read when the tensor is one slab,
    else from one more read of that tensor); the others are listed in ``next_skipped``.
    """
    float_keys = set(_float_keys(trajectory))
    mine = [k for k in owned_keys(trajectory, group) if k in float_keys]
    local: dict[str, tuple[torch.Tensor, torch.Tensor, int, Rank1Features | None, bool]] = {}
    k = len(trajectory.checkpoints)
    work = _Workspace(device)
    with _threads(device), FileHandles() as handles, _bar(len(mine), "read", progress and group.is_main) as bar:
        for key in mine:
            modelled, fits = _next_eligible(trajectory, key, next_horizon, budget)
            series = TripletSeries(next_horizon) if fits and next_horizon is not None else None
            entry = trajectory.latest.entries[key]
            held = (next_horizon + 2) * 4 * entry.numel if series is not None and next_horizon is not None else 0  # the series' copies
            single = len(slab_bounds(entry, k + 1, budget - held)) == 1 and held < budget
            stats = _tensor_stats(trajectory, handles, key, budget, work, series if single else None)
            if series is not None and not single:
                _tensor_triplets(trajectory, handles, key, series, work)
            local[key] = (*stats, series.features() if series is not None else None, modelled and not fits)
            bar.update(1)
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, int, Rank1Features | None, bool]] = {}
    for part in group.all_gather(local):
        merged.update(part)
    keys = [k for k in trajectory.keys if k in float_keys]
    grams = torch.stack([merged[key][0] for key in keys]) if keys else torch.zeros(0, k, k, dtype=torch.float64)
    unchanged = torch.zeros(k, dtype=torch.int64)
    for key in keys:
        unchanged += merged[key][1]
    low_elements = sum(merged[key][2] for key in keys)
    features = {key: merged[key][3] for key in keys if merged[key][3] is not None}
    skipped = [key for key in keys if merged[key][4]]
    return DenseStats(keys, grams, unchanged, low_elements, features, skipped)  # type: ignore[arg-type]


def resolution_warning(trajectory: DenseTrajectory, stats: DenseStats) -> str | None:
    """A measured warning when most 16-bit weights did not move between consecutive checkpoints."""
    if stats.low_precision_elements == 0 or len(trajectory.checkpoints) < 2:
        return None
    fractions = (stats.unchanged[1:].double() / stats.low_precision_elements).tolist()
    median = sorted(fractions)[len(fractions) // 2]
    if median < UNCHANGED_WARN:
        return None
    return (
        f"{median:.0%} of the 16-bit weights are bit-identical between consecutive checkpoints (median over steps): "
        "per-step updates below bf16/fp16 resolution are lost in these saves; save fp32 weights "
        "(or the trainer's fp32 master copy) for a faithful trajectory"
    )


# ------------------------------------------------------------------------------------- backtest


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


# ---------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class WriteJob:
    """One extrapolated model: per-tensor weights over the steps (rows in :attr:`DenseStats.keys`
    order) and the tensors its values are written into (an output model folder, a resume copy ...)."""

    weights: torch.Tensor  # (N, K) float64
    targets: tuple[WriteTarget, ...]
    #: per 2-D tensor, a rank-1 update ``outer(left, right)`` added too (NExt's predicted triplet)
    rank1: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _extrapolated_slabs(
    trajectory: DenseTrajectory,
    handles: FileHandles,
    key: str,
    bounds: tuple[int, int],
    weights: list[torch.Tensor],
    rank1: list[tuple[torch.Tensor, torch.Tensor] | None],
    work: _Workspace,
) -> list[torch.Tensor]:
    """``W_last + sum_i w_i (W_i - W_ref) [+ outer(left, right)]`` on one slab for every job's
    weights ``w`` (and rank-1 term) (float32), reading each checkpoint's slab once whatever the number of jobs."""
    start, stop = bounds
    size = stop - start
    raw = work.raw(size)
    slots = work.f32("write", 3 + len(weights), size)
    latest = read_into(handles, trajectory.latest, key, start, stop, slots[0], raw)
    outs = [slots[3 + j].copy_(latest) for j in range(len(weights))]
    used = [i for i in range(len(trajectory.checkpoints)) if any(float(w[i]) != 0.0 for w in weights)]
    if used:
        ref = read_into(handles, trajectory.reference, key, start, stop, slots[1], raw)
    for i in used:
        delta = read_into(handles, trajectory.checkpoints[i], key, start, stop, slots[2], raw).sub_(ref)
        for out, w in zip(outs, weights, strict=True):
            if float(w[i]) != 0.0:
                out.add_(delta, alpha=float(w[i]))
    for out, term in zip(outs, rank1, strict=True):
        if term is not None:
            left, right = term
            cols = right.shape[0]
            out.view(-1, cols).addr_(left[start // cols : stop // cols].to(out), right.to(out))
    return outs


def _stored(values: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    stored = values.to(dtype)
    if dtype.is_floating_point and not bool(torch.isfinite(stored).all()):
        raise NumericalError(f"{key}: the extrapolated weights are not finite in {dtype}; lower the coefficient or use another --method")
    return stored


#: float32 rows the write pass holds per element besides one per job (latest, reference, one checkpoint)
_WRITE_SERIES = 3


def write_extrapolated_model(
    trajectory: DenseTrajectory,
    jobs: Sequence[WriteJob],
    stats: DenseStats,
    out_dir: Path,
    group: Group,
    *,
    device: torch.device,
    budget: int,
    progress: bool = False,
) -> None:
    """Pass 2: fill this rank's tensors into every job's targets (files under ``out_dir`` created beforehand).

    Each slab of every checkpoint is read once for all jobs; non-float tensors are copied from the latest checkpoint.
    """
    row = {key: i for i, key in enumerate(stats.keys)}
    k = len(trajectory.checkpoints)
    zero = torch.zeros(k, dtype=torch.float64)
    mine = owned_keys(trajectory, group)
    work = _Workspace(device)
    with (
        _threads(device),
        FileHandles() as reads,
        FileHandles(write=True) as writes,
        _bar(len(mine), "write", progress and group.is_main) as bar,
    ):
        for key in mine:
            entry = trajectory.latest.entries[key]
            weights = [job.weights[row[key]] if key in row else zero for job in jobs]
            rank1 = [job.rank1.get(key) for job in jobs]
            for start, stop in slab_bounds(entry, _WRITE_SERIES + len(jobs) + 1, budget):
                if entry.dtype.is_floating_point:
                    slabs = _extrapolated_slabs(trajectory, reads, key, (start, stop), weights, rank1, work)
                else:
                    slabs = [read_slab(reads, trajectory.latest, key, start, stop, work.raw(stop - start))] * len(jobs)
                for job, values in zip(jobs, slabs, strict=True):
                    for target in job.targets:
                        if key in target.entries:
                            dest = target.entries[key]
                            write_slab(writes, out_dir / target.root, dest, start, _stored(values, dest.dtype, key))
            bar.update(1)


# -------------------------------------------------------------------------------------- inspect


@dataclass
class Rank1Energy:
    """Per step, ``sum sigma_1^2 / sum |G_t|_F^2`` over the 2-D tensors that fit the budget."""

    top: torch.Tensor  # (K,) float64
    total: torch.Tensor  # (K,) float64
    tensors: int
    skipped: int


def rank1_energy(trajectory: DenseTrajectory, device: torch.device, budget: int) -> Rank1Energy:
    """Top singular triplet of every 2-D global delta ``G_t = W_t - W_ref`` at every step, by subspace
    iteration warm-started from the previous step's ``v`` (sign-aligned to its ``u``).

    Tensors whose float32 delta (plus two staging copies) exceeds ``budget`` are skipped and counted.
    """
    k = len(trajectory.checkpoints)
    top, total = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    done = skipped = 0
    work = _Workspace(device)
    with _threads(device), FileHandles() as handles:
        for key in _float_keys(trajectory):
            entry = trajectory.latest.entries[key]
            if len(entry.shape) != 2:
                continue
            if entry.numel * 4 * 3 > budget:
                skipped += 1
                continue
            raw = work.raw(entry.numel)
            ref = read_into(handles, trajectory.reference, key, 0, entry.numel, work.f32("r1-ref", 1, entry.numel)[0], raw)
            previous: Triplet | None = None
            for t, checkpoint in enumerate(trajectory.checkpoints):
                delta = read_into(handles, checkpoint, key, 0, entry.numel, work.f32("r1-delta", 1, entry.numel)[0], raw).sub_(ref)
                matrix = delta.view(1, *entry.shape)
                total[t] += float(matrix.double().square().sum())
                if not bool(matrix.any()):
                    continue
                triplet = top_triplet(matrix, init=previous.v if previous is not None else None)
                previous = align_signs(triplet, previous.u if previous is not None else None)
                top[t] += float(previous.sigma.double().square().sum())
            done += 1
    return Rank1Energy(top=top, total=total, tensors=done, skipped=skipped)


def dense_inspect(trajectory: DenseTrajectory, stats: DenseStats, rank1: Rank1Energy | None = None) -> dict[str, Any]:
    """Layout, steps, tensors and the temporal structure of a full-parameter trajectory (JSON-able)."""
    from nextoffline.ops.predictors.trajectory import rank1_from_gram

    grams = stats.grams
    diag = torch.diagonal(grams, dim1=-2, dim2=-1)  # (N, K): |g_t|^2
    k = len(trajectory.checkpoints)
    local = [float((diag[:, t] - 2 * grams[:, t, t - 1] + diag[:, t - 1]).clamp_min(0).sum()) if t else None for t in range(k)]
    explained = rank1_from_gram(grams).explained if len(stats.keys) else torch.zeros(0, dtype=torch.float64)
    energy = diag.sum(-1)
    total = float(energy.sum())
    entries = trajectory.latest.entries
    low = stats.low_precision_elements
    return {
        "source": trajectory.source_label,
        "format": trajectory.layout,
        "kind": "full-parameter",
        "steps": trajectory.step_numbers,
        "reference": str(trajectory.base.folder) if trajectory.base else f"earliest checkpoint (step {trajectory.step_numbers[0]})",
        "num_tensors": len(entries),
        "parameters": sum(e.numel for e in entries.values()),
        "bytes_per_checkpoint": trajectory.total_bytes(),
        "dtypes": sorted({str(e.dtype).removeprefix("torch.") for e in entries.values()}),
        "weight_files": list(trajectory.latest.files),
        "per_step": [
            {
                "step": step,
                "global_norm": math.sqrt(float(diag[:, t].sum())),
                "local_norm": math.sqrt(local[t]) if local[t] is not None else None,
                "unchanged_16bit_fraction": (float(stats.unchanged[t]) / low) if (t and low) else None,
                "global_rank1_energy": (float(rank1.top[t] / rank1.total[t]) if float(rank1.total[t]) > 0 else None) if rank1 else None,
            }
            for t, step in enumerate(trajectory.step_numbers)
        ],
        "trajectory_explained_variance": float((explained * energy).sum()) / total if total > 0 else 1.0,
        "rank1_tensors": rank1.tensors if rank1 else 0,
        "rank1_skipped_over_budget": rank1.skipped if rank1 else 0,
        "warning": resolution_warning(trajectory, stats),
    }
