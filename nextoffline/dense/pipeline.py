"""Full-parameter trajectories: statistics pass, slab-wise write, inspect.

Two streamed passes over the files, tensor by tensor and slab by slab (peak memory: the chunk
budget plus small per-tensor results, whatever the number of checkpoints or the model size):

1. :func:`collect_stats`: per tensor, the ``K x K`` temporal Gram of the global deltas
   (float64) and, for 16-bit weights, how many elements did not change between consecutive
   checkpoints (updates below the dtype's resolution are lost); with ``next_horizon``, NExt's
   triplet series of every 2-D tensor.
2. :func:`write_extrapolated_model`: ``W_last + sum_i w_i (W_i - W_ref)`` per slab for every
   :class:`WriteJob`, cast to each target's stored dtype and written at its byte offsets (the
   output model folder, and the trainer's own files in a ``--resumable`` copy).

Fitting and selection (:mod:`nextoffline.dense.select`) need only these statistics. Under
``torchrun`` each rank reads the tensors :func:`~nextoffline.dense.dist.partition` gives it,
the statistics are gathered, every rank fits all tensors identically (NExt: rank 0 trains and
broadcasts), and each rank writes its tensors into the shared output files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nextoffline.dense.dist import Group, partition
from nextoffline.dense.layout import DenseTrajectory, WriteTarget
from nextoffline.dense.stream import FileHandles, read_into, read_slab, slab_bounds, write_slab
from nextoffline.errors import NumericalError
from nextoffline.loader import BufferPool
from nextoffline.ops.chunk import Rank1Features
from nextoffline.ops.dense import (
    Triplet,
    TripletSeries,
    accumulate_gram,
    align_signs,
    top_triplet,
)
from nextoffline.ops.device import single_thread

__all__ = [
    "DenseStats",
    "Rank1Energy",
    "WriteJob",
    "collect_stats",
    "dense_inspect",
    "owned_keys",
    "rank1_energy",
    "resolution_warning",
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
    advice = trajectory.precision_note or "save fp32 weights (or the trainer's fp32 master copy) for a faithful trajectory"
    return (
        f"{median:.0%} of the 16-bit weights are bit-identical between consecutive checkpoints (median over steps): "
        f"per-step updates below bf16/fp16 resolution are lost in these saves; {advice}"
    )


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
        "reference": trajectory.reference_label,
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
