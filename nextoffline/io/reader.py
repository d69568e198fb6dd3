"""Lazy tensor readers over one weight file (safetensors via mmap, or a torch pickle).

Only headers are read when a reader is opened; tensors are read one key at a time. Every
failure becomes an :class:`~nextoffline.errors.AdapterFileError` naming the file.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from nextoffline.errors import AdapterFileError

__all__ = [
    "SafetensorsReader",
    "StateDictReader",
    "TensorReader",
    "open_tensors",
    "register_state_loader",
]

LOG = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
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
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class TensorReader(Protocol):
    """Read-only access to the tensors of one file, by key."""

    path: Path

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...


_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces


def _read_safetensors_header(path: Path) -> dict:
    """Parse and validate the JSON header of a safetensors file (no tensor data is read)."""
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
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, key: str, spec: object, data_len: int, fix: str) -> tuple[int, int]:
    """Validate one header entry: known dtype, offsets inside the file, size matches shape."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(f"{path}: corrupted safetensors header entry {key!r}; {fix}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
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
    if end - begin != numel * _DTYPE_SIZES[dtype]:
        raise AdapterFileError(f"{path}: corrupted safetensors header (size of {key!r} mismatches its shape {shape}); {fix}")
    return begin, end


class SafetensorsReader:
    """Lazy reader over a safetensors file (memory-mapped; pays only for the keys read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header = _read_safetensors_header(path)
        self._specs = {k: v for k, v in header.items() if k != "__metadata__"}
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterFileError(f"{path}: cannot open safetensors file ({exc}); re-save this checkpoint") from None

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._specs[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._specs[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterFileError(f"{self.path}: cannot read tensor {key!r} ({exc})") from None

    def close(self) -> None:
        self._handle = None


StateLoader = Callable[[Path], "dict[str, torch.Tensor]"]
_STATE_LOADERS: list[tuple[Callable[[Path], bool], StateLoader]] = []


def register_state_loader(matches: Callable[[Path], bool], loader: StateLoader) -> None:
    """Let a trainer format read its own pickle layout (e.g. DeepSpeed model states)."""
    _STATE_LOADERS.append((matches, loader))


def _default_state_loader(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise AdapterFileError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


class StateDictReader:
    """Reader over a torch pickle holding a flat ``{key: tensor}`` mapping."""

    def __init__(self, path: Path, loader: StateLoader | None = None) -> None:
        self.path = path
        load = loader or _default_state_loader
        try:
            state = load(path)
        except AdapterFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.load raises many unrelated types
            raise AdapterFileError(f"{path}: cannot load torch checkpoint ({type(exc).__name__}); re-save it") from None
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return sorted(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]

    def close(self) -> None:
        self._state = {}


def open_tensors(path: Path) -> TensorReader:
    """Open ``path`` lazily with the reader that fits its type."""
    if not path.is_file():
        raise AdapterFileError(f"{path}: weight file is missing; check the checkpoint folder")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    for matches, loader in _STATE_LOADERS:
        if matches(path):
            return StateDictReader(path, loader)
    return StateDictReader(path)


def read_keys(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the given keys of one file (convenience for small adapters and tests)."""
    reader = open_tensors(path)
    try:
        return {key: reader.get(key) for key in keys}
    finally:
        reader.close()
