"""Stream a trajectory as :class:`~nextoffline.ops.chunk.FactorChunk` batches.

Modules of identical shape are grouped; each group is cut into chunks that fit a memory
budget, and each chunk is read across all steps. Reading is split in two stages so that
they can overlap (:func:`iter_chunks` reads the next chunk in a background thread while the
caller computes on the current one):

1. :func:`read_raw` copies the stored bytes of every factor of the chunk, at every step, into
   one staging tensor per factor kind, in the stored dtype. Safetensors files are read with
   ``os.preadv`` straight into the staging memory (one kernel copy from the page cache, no
   per-tensor allocation; pinned memory when the compute device is CUDA). Other formats
   (torch pickles) go through their :class:`~nextoffline.io.reader.TensorReader`.
2. :func:`to_chunk` checks the values are finite, widens them to the compute dtype (bf16 to
   fp32 by an integer shift on CPU), moves them to the compute device and applies the
   trajectory's exact power-of-two ``factor_scale``, once per chunk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from nextoffline.errors import AdapterFileError, NumericalError
from nextoffline.io.reader import SafetensorsReader, TensorReader, open_tensors
from nextoffline.io.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.device import COMPUTE_DTYPE, to_compute
from nextoffline.types import LoraModule, Trajectory

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BufferPool",
    "ChunkPlan",
    "RawChunk",
    "iter_chunks",
    "open_readers",
    "plan_chunks",
    "pread_exact",
    "read_chunk",
    "read_raw",
    "to_chunk",
]

LOG = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ChunkPlan:
    """A list of same-shape modules read and processed together."""

    modules: tuple[LoraModule, ...]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]


@dataclass
class RawChunk:
    """Stored factor values of one chunk, before widening: ``b`` ``(K, N, m, r)``, ``a`` ``(K, N, r, n)``."""

    plan: ChunkPlan
    step_index: list[int]
    b: torch.Tensor
    a: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.b.numel() * self.b.element_size() + self.a.numel() * self.a.element_size()


def plan_chunks(trajectory: Trajectory, *, num_steps: int | None = None, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> list[ChunkPlan]:
    """Cut every shape group into chunks whose fp32 factors over all steps fit ``budget_bytes``."""
    steps = num_steps or len(trajectory.steps)
    plans: list[ChunkPlan] = []
    for (m, n, r), modules in trajectory.groups().items():
        per_module = steps * (m + n) * r * torch.finfo(COMPUTE_DTYPE).bits // 8
        size = max(1, budget_bytes // max(per_module, 1))
        plans.extend(ChunkPlan(tuple(modules[i : i + size])) for i in range(0, len(modules), size))
    return plans


@contextmanager
def open_readers(trajectory: Trajectory) -> Iterator[list[TensorReader]]:
    """One lazy reader per step, closed on exit."""
    readers: list[TensorReader] = []
    try:
        for ref in trajectory.steps:
            readers.append(open_tensors(ref.weights_file))
        yield readers
    finally:
        for reader in readers:
            reader.close()


# ------------------------------------------------------------------------------------ raw reads


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int


#: Float dtypes the raw reader widens itself (others go through the lazy reader).
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=256)
def _layout(path: str, size: int, mtime_ns: int) -> dict[str, _Entry]:
    """Key -> position of the tensor bytes in a safetensors file (header only; cached)."""
    del size, mtime_ns  # cache key only
    header = read_safetensors_header(Path(path))
    out = {}
    for key, spec in header.tensors.items():
        dtype = SAFETENSORS_DTYPES[spec["dtype"]]
        if dtype not in _FLOAT_DTYPES:
            continue
        begin, end = spec["data_offsets"]
        out[key] = _Entry(dtype, tuple(int(d) for d in spec["shape"]), header.data_start + int(begin), int(end) - int(begin))
    return out


def _safetensors_layout(reader: TensorReader) -> dict[str, _Entry] | None:
    if not isinstance(reader, SafetensorsReader):
        return None
    stat = reader.path.stat()
    try:
        return _layout(str(reader.path), stat.st_size, stat.st_mtime_ns)
    except (OSError, AdapterFileError):
        return None  # the reader validated the file; fall back to it for the error message


def _pread_into(fd: int, target: torch.Tensor, offset: int, path: Path) -> None:
    """Fill the contiguous ``target`` with the file bytes at ``offset`` (loops on short reads)."""
    pread_exact(fd, memoryview(target.view(-1).view(torch.uint8).numpy()), offset, path)


def pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` with the bytes of ``fd`` at ``offset``, looping on short reads.

    Raises:
        AdapterFileError: the file ends first (truncated checkpoint).
    """
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise AdapterFileError(f"{path}: file is truncated (short read at byte {offset + done}); re-save this checkpoint")
        done += n


class BufferPool:
    """Reusable flat CPU buffers handed out as shaped views (avoids page-faulting fresh memory:
    a new 150 MB tensor costs ~4x more to fill than a reused one)."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype, *, pin_memory: bool = False) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= int(dim)
        key = (name, dtype, pin_memory)
        flat = self._store.get(key)
        if flat is None or flat.numel() < numel:
            self._store.pop(key, None)
            flat = torch.empty(numel, dtype=dtype, pin_memory=pin_memory)
            self._store[key] = flat
        return flat[:numel].view(*shape)

    def clear(self) -> None:
        self._store.clear()


def _staging_dtype(plan: ChunkPlan, trajectory: Trajectory, kind: str) -> torch.dtype:
    names = {trajectory.dtypes.get(m.b_key if kind == "b" else m.a_key, "float32") for m in plan.modules}
    dtype = getattr(torch, names.pop()) if len(names) == 1 else COMPUTE_DTYPE
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64) else COMPUTE_DTYPE


def read_raw(
    plan: ChunkPlan,
    trajectory: Trajectory,
    readers: Sequence[TensorReader],
    *,
    step_index: Sequence[int] | None = None,
    pin_memory: bool = False,
    buffers: BufferPool | None = None,
    slot: int = 0,
) -> RawChunk:
    """Copy the stored factors of ``plan`` at the given steps (default all) into staging tensors.

    No arithmetic: this is the I/O part of :func:`read_chunk` (the benchmarks time it alone).
    With ``buffers``, the staging tensors are views of that pool's ``slot`` (reused memory:
    no page faults after the first chunk) and stay valid until the slot is used again.
    """
    index = list(range(len(readers))) if step_index is None else list(step_index)
    first = plan.modules[0]
    m, n, r = first.out_features, first.in_features, first.rank
    shapes = {"b": (m, r), "a": (r, n)}
    staged = {}
    for kind in ("b", "a"):
        dtype = _staging_dtype(plan, trajectory, kind)
        shape = (len(index), len(plan.modules), *shapes[kind])
        if buffers is not None:
            staged[kind] = buffers.take(f"raw-{kind}-{slot}", shape, dtype, pin_memory=pin_memory)
        else:
            staged[kind] = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    for slot, t in enumerate(index):
        reader = readers[t]
        layout = _safetensors_layout(reader)
        fd = os.open(reader.path, os.O_RDONLY) if layout is not None else -1
        try:
            for i, module in enumerate(plan.modules):
                for kind, key in (("b", module.b_key), ("a", module.a_key)):
                    target = staged[kind][slot, i]
                    entry = layout.get(key) if layout is not None else None
                    if entry is not None and entry.dtype == target.dtype and entry.shape == tuple(target.shape):
                        _pread_into(fd, target, entry.offset, reader.path)
                    else:
                        value = reader.get(key)
                        if tuple(value.shape) != tuple(target.shape):
                            raise AdapterFileError(
                                f"{reader.path}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                            )
                        target.copy_(value)
        finally:
            if fd >= 0:
                os.close(fd)
    return RawChunk(plan=plan, step_index=index, b=staged["b"], a=staged["a"])


# ----------------------------------------------------------------------------------- conversion


#: Largest |s B| or |A| (after ``factor_scale``) whose float32 products and squares cannot overflow.
MAX_FACTOR = 1e6


def _check_values(raw: RawChunk, trajectory: Trajectory, b: torch.Tensor, a: torch.Tensor) -> None:
    """One pass over the widened factors: NaN/Inf, then values far beyond the others.

    The per-(step, module) max-norm propagates NaN and Inf, so one read answers both checks.
    Factors far beyond the others (e.g. ~1e30 from corrupted bits) would overflow float32 later.
    """
    scaling = torch.tensor([m.scaling for m in raw.plan.modules], dtype=torch.float64)
    tops = {kind: _max_abs(t) for kind, t in (("b", b), ("a", a))}
    for kind, top in tops.items():
        _raise_at(raw, trajectory, kind, ~torch.isfinite(top), "holds NaN or Inf; use an earlier checkpoint or drop this step")
    for kind, top in tops.items():
        weight = scaling if kind == "b" else torch.ones_like(scaling)
        _raise_at(
            raw,
            trajectory,
            kind,
            top * weight > MAX_FACTOR,
            "holds values far beyond the range of the other LoRA factors (too large for float32 arithmetic); "
            "the file is probably corrupted: re-save it or drop this step",
        )


def _max_abs(tensor: torch.Tensor) -> torch.Tensor:
    """Per-(step, module) ``max |x|`` (NaN if any NaN): ``max(amax, -amin)`` streams ~5x faster
    than ``vector_norm(ord=inf)`` or ``abs().amax()`` on CPU."""
    flat = tensor.flatten(2)
    return torch.maximum(flat.amax(-1), flat.amin(-1).neg()).double().cpu()


def _raise_at(raw: RawChunk, trajectory: Trajectory, kind: str, bad: torch.Tensor, message: str) -> None:
    if bool(bad.any()):
        slot, i = (int(x) for x in bad.nonzero()[0])
        module = raw.plan.modules[i]
        path = trajectory.steps[raw.step_index[slot]].weights_file
        raise NumericalError(f"{path}: tensor {module.b_key if kind == 'b' else module.a_key} {message}")


def _widen(raw: torch.Tensor, device: torch.device, buffers: BufferPool | None, name: str) -> torch.Tensor:
    if buffers is None or device.type != "cpu":
        return to_compute(raw, device)
    out = buffers.take(name, raw.shape, COMPUTE_DTYPE)
    return out.copy_(raw)  # exact widening; into reused memory this beats the bit-shift trick


def to_chunk(raw: RawChunk, trajectory: Trajectory, device: torch.device, *, buffers: BufferPool | None = None) -> FactorChunk:
    """Check, widen to the compute dtype and move a :class:`RawChunk` to ``device``.

    With ``buffers`` (CPU), the chunk's ``b`` and ``a`` are views of reused memory that the
    next call overwrites: the caller must not keep references to them (or views of them).
    """
    b, a = _widen(raw.b, device, buffers, "b"), _widen(raw.a, device, buffers, "a")
    scale_b, scale_a = getattr(trajectory, "factor_scale", (1.0, 1.0))
    if scale_b != 1.0:  # exact power-of-two rescaling of extreme factors (undone when writing)
        b.mul_(scale_b)
    if scale_a != 1.0:
        a.mul_(scale_a)
    _check_values(raw, trajectory, b, a)
    steps = torch.tensor([trajectory.steps[t].step for t in raw.step_index], dtype=torch.float64)
    scaling = torch.tensor([m.scaling for m in raw.plan.modules], dtype=COMPUTE_DTYPE, device=device)
    return FactorChunk(names=raw.plan.names, steps=steps, b=b, a=a, scaling=scaling)


def read_chunk(
    plan: ChunkPlan,
    trajectory: Trajectory,
    readers: Sequence[TensorReader],
    device: torch.device,
    *,
    step_index: Sequence[int] | None = None,
) -> FactorChunk:
    """Read the factors of ``plan`` at the given steps (default all) into one chunk."""
    raw = read_raw(plan, trajectory, readers, step_index=step_index, pin_memory=_pin(device))
    return to_chunk(raw, trajectory, device)


def _pin(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def iter_chunks(
    trajectory: Trajectory,
    device: torch.device,
    *,
    budget_bytes: int = DEFAULT_CHUNK_BYTES,
    step_index: Sequence[int] | None = None,
    prefetch: bool | None = None,
    reuse: bool = False,
    modules: Collection[str] | None = None,
) -> Iterator[tuple[ChunkPlan, FactorChunk]]:
    """Every chunk of the trajectory, in plan order; with ``prefetch`` the next chunk's bytes are
    read in a background thread while the caller works on the current one (file reads release
    the GIL). ``None`` (default) prefetches when it can overlap: with a CUDA device, or when
    torch leaves a CPU core free (copying from the page cache needs a core; taking one from
    busy-waiting BLAS threads made streaming 2x slower on a 2-core machine).

    Staging memory is always reused (two slots alternate). With ``reuse=True`` the widened
    chunk tensors are reused too: each yielded chunk's ``b``/``a`` are overwritten by the next
    one, so the consumer must not keep them (or views of them) past its iteration.

    ``modules`` (default: all) restricts the read to the chunks holding one of these modules.

    Memory: two raw chunks (stored dtype) and one widened chunk at a time.
    """
    index = None if step_index is None else list(step_index)
    plans = plan_chunks(trajectory, num_steps=len(index) if index is not None else None, budget_bytes=budget_bytes)
    if modules is not None:
        plans = [plan for plan in plans if any(name in modules for name in plan.names)]
    pin = _pin(device)
    if prefetch is None:
        prefetch = device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
    staging = BufferPool()
    widened = staging if reuse else None
    with open_readers(trajectory) as readers:
        if not prefetch or len(plans) < 2:
            for plan in plans:
                raw = read_raw(plan, trajectory, readers, step_index=index, pin_memory=pin, buffers=staging)
                yield plan, to_chunk(raw, trajectory, device, buffers=widened)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextoffline-read") as pool:

            def submit(j: int):
                return pool.submit(read_raw, plans[j], trajectory, readers, step_index=index, pin_memory=pin, buffers=staging, slot=j % 2)

            pending = submit(0)
            try:
                for j, plan in enumerate(plans):
                    raw = pending.result()
                    if j + 1 < len(plans):  # the other slot: free since chunk j - 1 was widened
                        pending = submit(j + 1)
                    chunk = to_chunk(raw, trajectory, device, buffers=widened)
                    if device.type == "cuda":  # the copy from this pinned slot must finish before slot reuse
                        torch.cuda.current_stream(device).synchronize()
                    del raw
                    yield plan, chunk
            finally:
                pending.cancel()
