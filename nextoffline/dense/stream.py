"""Slab-wise reads and writes of one tensor across a full-parameter trajectory.

A tensor is cut into slabs of whole rows (its first dimension) so that the float32 values of
one slab at every step fit the chunk budget; bytes are read with ``os.preadv`` into reused
buffers (no memory map: the resident set stays bounded by the budget however large the files)
and written with ``os.pwrite`` at the byte offsets of the output file, so several processes
can fill one file. A tensor's elements may be spread over several files (its
:class:`~nextoffline.dense.layout.Piece` runs): a slab is gathered from, or scattered to, the
pieces it overlaps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nextoffline.dense.layout import DenseCheckpoint, Piece, TensorEntry
from nextoffline.errors import AdapterFileError
from nextoffline.loader import pread_exact
from nextoffline.ops.device import to_compute

__all__ = ["FileHandles", "overlapping", "read_compute", "read_into", "read_slab", "slab_bounds", "write_slab"]

#: float32 value + float64 Gram copy + stored bytes per element and series (upper bound)
_BYTES_PER_ELEMENT = 4 + 8 + 4


def slab_bounds(entry: TensorEntry, num_series: int, budget_bytes: int) -> list[tuple[int, int]]:
    """Element ranges ``[start, stop)`` of whole rows whose values over ``num_series`` checkpoints fit the budget."""
    rows = entry.shape[0] if entry.shape else 1
    row = entry.numel // rows if rows else 0
    if entry.numel == 0:
        return []
    per_row = max(1, row * num_series * _BYTES_PER_ELEMENT)
    step = max(1, budget_bytes // per_row)
    return [(r * row, min(r + step, rows) * row) for r in range(0, rows, step)]


class FileHandles:
    """Open file descriptors by path (read-only or read-write), closed together."""

    def __init__(self, *, write: bool = False) -> None:
        self._fds: dict[Path, int] = {}
        self._flags = os.O_RDWR if write else os.O_RDONLY

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, self._flags)
            except OSError as exc:
                raise AdapterFileError(f"{path}: cannot open ({exc.strerror or exc})") from None
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FileHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def overlapping(entry: TensorEntry, start: int, stop: int) -> list[tuple[Piece, int, int]]:
    """The pieces of ``entry`` that hold elements of ``[start, stop)``, each with the overlap ``[lo, hi)``."""
    out = []
    for piece in entry.pieces:
        lo, hi = max(start, piece.start), min(stop, piece.start + piece.numel)
        if lo < hi:
            out.append((piece, lo, hi))
    return out


def read_slab(
    handles: FileHandles, checkpoint: DenseCheckpoint, key: str, start: int, stop: int, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored values ``[start, stop)`` of the flattened tensor ``key`` (1-D, stored dtype).

    ``buffer`` (a flat uint8 tensor, grown when too small) is reused when given.
    """
    entry = checkpoint.entries[key]
    size = entry.dtype.itemsize
    nbytes = (stop - start) * size
    raw = buffer[:nbytes] if buffer is not None and buffer.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    for piece, lo, hi in overlapping(entry, start, stop):
        path = checkpoint.folder / piece.file
        pread_exact(handles.fd(path), view[(lo - start) * size : (hi - start) * size], piece.offset + (lo - piece.start) * size, path)
    return raw.view(entry.dtype)


def read_into(
    handles: FileHandles, checkpoint: DenseCheckpoint, key: str, start: int, stop: int, out: torch.Tensor, raw: torch.Tensor
) -> torch.Tensor:
    """Read ``[start, stop)`` of ``key`` into the float32 tensor ``out`` (1-D, on the compute device),
    staging the stored bytes in ``raw`` (a flat uint8 buffer large enough): no allocation per slab.

    bf16 is widened on CPU by an integer shift into ``out``'s memory (exact; bf16 is the upper half of fp32).
    """
    stored = read_slab(handles, checkpoint, key, start, stop, raw)
    if stored.dtype == torch.bfloat16 and out.device.type == "cpu":
        bits = out.view(torch.int32)
        bits.copy_(stored.view(torch.int16))
        bits.bitwise_left_shift_(16)
    else:
        out.copy_(stored.to(out.device, non_blocking=False))
    return out


def read_compute(
    handles: FileHandles, checkpoint: DenseCheckpoint, key: str, start: int, stop: int, device: torch.device, buffer: torch.Tensor
) -> torch.Tensor:
    """:func:`read_slab` widened to float32 on ``device`` (fresh memory, never a view of ``buffer``)."""
    raw = read_slab(handles, checkpoint, key, start, stop, buffer)
    out = to_compute(raw, device)
    return out.clone() if out.data_ptr() == raw.data_ptr() else out


def write_slab(handles: FileHandles, root: Path, entry: TensorEntry, start: int, values: torch.Tensor) -> None:
    """Write ``values`` (``entry``'s stored dtype, 1-D) at element ``start`` of ``entry``, whose pieces are under ``root``."""
    data = memoryview(values.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    size = values.element_size()
    for piece, lo, hi in overlapping(entry, start, start + values.numel()):
        fd = handles.fd(root / piece.file)
        chunk, offset = data[(lo - start) * size : (hi - start) * size], piece.offset + (lo - piece.start) * size
        done = 0
        while done < len(chunk):
            done += os.pwrite(fd, chunk[done:], offset + done)
