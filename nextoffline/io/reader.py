"""Lazy tensor readers over one weight file (safetensors via mmap, or a torch pickle).

Only headers are read when a reader is opened; tensors are read one key at a time. Every
failure becomes an :class:`~nextoffline.errors.AdapterFileError` naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from nextoffline.errors import AdapterFileError
from nextoffline.io.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header

__all__ = [
    "SafetensorsReader",
    "StateDictReader",
    "TensorReader",
    "open_tensors",
    "register_state_loader",
]

LOG = logging.getLogger(__name__)


class TensorReader(Protocol):
    """Read-only access to the tensors of one file, by key."""

    path: Path

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...


class SafetensorsReader:
    """Lazy reader over a safetensors file (memory-mapped; pays only for the keys read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._specs = read_safetensors_header(path).tensors
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterFileError(f"{path}: cannot open safetensors file ({exc}); re-save this checkpoint") from None

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._specs[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._specs[key]["dtype"]]

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
