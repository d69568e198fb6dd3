"""The one safetensors header reader: parse and validate the JSON header (no tensor data).

Both the lazy reader (:mod:`nextoffline.io.reader`) and the raw chunk reader
(:mod:`nextoffline.loader`) use it, so a corrupted or truncated file fails the same way,
with one line naming the file, wherever it is read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextoffline.errors import AdapterFileError

__all__ = ["DTYPE_SIZES", "SAFETENSORS_DTYPES", "SafetensorsHeader", "read_safetensors_header"]

#: safetensors dtype names -> torch dtypes (every dtype a LoRA checkpoint may carry).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header.

    Attributes:
        tensors: key -> ``{"dtype", "shape", "data_offsets"}`` as stored (offsets relative to ``data_start``).
        metadata: the ``__metadata__`` strings.
        data_start: absolute file offset of the first tensor byte.
    """

    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int


_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the JSON header of a safetensors file (no tensor data is read).

    Raises:
        AdapterFileError: the file is unreadable, truncated or its header is corrupted.
    """
    fix = "re-save or re-download this checkpoint"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterFileError(f"{path}: file is truncated ({size} bytes, no header); {fix}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len < 2 or header_len > _MAX_HEADER_BYTES:
                raise AdapterFileError(f"{path}: corrupted safetensors header (header length {header_len}); {fix}")
            if 8 + header_len > size:
                raise AdapterFileError(f"{path}: file is truncated ({size} bytes, the header alone needs {8 + header_len}); {fix}")
            raw = handle.read(header_len)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFileError(f"{path}: corrupted safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: corrupted safetensors header (not a JSON object); {fix}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: corrupted safetensors header (__metadata__ must map names to strings); {fix}")
    data_len = size - 8 - header_len
    spans = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        spans.append((*_check_entry(path, key, spec, data_len, fix), key))
    covered = 0
    for begin, end, key in sorted(spans):
        if begin != covered:
            what = "overlaps another tensor" if begin < covered else "leaves a gap before it"
            raise AdapterFileError(f"{path}: corrupted safetensors header (tensor {key!r} {what}); {fix}")
        covered = end
    if covered != data_len:
        raise AdapterFileError(f"{path}: file has {data_len - covered} unexpected bytes after the last tensor; {fix}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return SafetensorsHeader(tensors, dict(metadata), 8 + header_len)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, key: str, spec: object, data_len: int, fix: str) -> tuple[int, int]:
    """Validate one header entry: known dtype, offsets inside the file, size matches shape."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(f"{path}: corrupted safetensors header entry {key!r}; {fix}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise AdapterFileError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}; save the adapter in float32, float16 or bfloat16")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise AdapterFileError(f"{path}: corrupted safetensors header (shape of {key!r} is {shape!r}); {fix}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise AdapterFileError(f"{path}: corrupted safetensors header (data offsets of {key!r} are {offsets!r}); {fix}")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    if end > data_len:
        raise AdapterFileError(f"{path}: file is truncated (tensor {key!r} ends past the end of the file); {fix}")
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise AdapterFileError(f"{path}: corrupted safetensors header (size of {key!r} mismatches its shape {shape}); {fix}")
    return begin, end
