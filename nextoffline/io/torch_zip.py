"""Read and patch ``torch.save`` zip checkpoints without importing the trainer's classes.

Trainer checkpoints (verl's FSDP shards, DeepSpeed's model and optimizer states) are torch
pickles that reference classes nextoffline must not import (DeepSpeed's ``LossScaler``, FSDP's
``DTensor``/``DeviceMesh`` as saved by another torch version). :func:`read_structure` walks the
pickle with an unpickler that imports nothing: every class becomes an :class:`Opaque` record of
its dotted path, arguments and state, every tensor a :class:`TensorRef` (storage key, offset,
shape, stride), and no tensor data is read.

:func:`patch_tensors` copies a checkpoint and overwrites the bytes of chosen tensors inside
their storage records, in place. The pickle, every other tensor and every non-tensor object stay
byte-identical, so dtype, sharding metadata and key names cannot drift; the zip CRCs of the
changed records are updated.
"""

from __future__ import annotations

import builtins
import io
import pickle
import shutil
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextoffline.errors import AdapterFileError

__all__ = [
    "Opaque",
    "StorageRef",
    "SubclassRef",
    "TensorRef",
    "patch_tensors",
    "read_structure",
    "read_tensor",
    "read_tensors",
    "state_of",
    "storage_spans",
]

_FIX = "re-save this checkpoint with the trainer, or point at an intact run folder"

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class StorageRef:
    """One storage record of the archive (``<archive>/data/<key>``)."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as pickled: a strided view into one storage record."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size


class Opaque:
    """An object of a class that was not imported: its dotted path, call arguments and state."""

    path = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque({self.path}, args={self.args!r}, state={self.state!r})"


def state_of(obj: Any) -> dict[str, Any]:
    """The attribute dict of an :class:`Opaque` (``{}`` when it has none)."""
    state = getattr(obj, "state", None)
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
        merged: dict[str, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return state if isinstance(state, dict) else {}


_STUBS: dict[str, type] = {}


def _stub_class(path: str) -> type:
    if path not in _STUBS:
        _STUBS[path] = type(path.rsplit(".", 1)[-1], (Opaque,), {"path": path})
    return _STUBS[path]


@dataclass(frozen=True)
class _WrapperRef:
    """The outer shell of a tensor subclass (e.g. a DTensor's global shape and dtype)."""

    cls_path: str
    dtype: torch.dtype
    size: tuple[int, ...]


@dataclass(frozen=True)
class SubclassRef:
    """A pickled tensor subclass (``DTensor``): its class path, outer shell and ``__dict__``."""

    cls_path: str
    shell: Any
    state: Mapping[str, Any]


def _rebuild_tensor(storage: StorageRef, offset: int, size: Any, stride: Any, *_rest: Any) -> TensorRef:
    return TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_wrapper(cls: Any, dtype: Any, size: Any, *_rest: Any) -> _WrapperRef:
    return _WrapperRef(getattr(cls, "path", str(cls)), dtype, tuple(int(s) for s in size))


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> SubclassRef:
    holder = Opaque()
    holder.state = state  # a dict, or (dict state, slot state) for classes with __slots__
    return SubclassRef(getattr(new_type, "path", str(new_type)), func(*args), state_of(holder))


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    return cls.__new__(cls) if isinstance(cls, type) and issubclass(cls, Opaque) else Opaque()


def _get_layout(name: str) -> str:
    return name


_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "tuple", "list", "dict", "int", "float", "bool", "str", "bytes", "bytearray"}


class _StructureUnpickler(pickle.Unpickler):
    """Resolves torch's rebuild helpers to recorders and every other class to an Opaque stub."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        special = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
            ("torch.serialization", "_get_layout"): _get_layout,
            ("copyreg", "_reconstructor"): _reconstructor,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch", "Size"): torch.Size,
            ("torch", "device"): torch.device,
        }
        if (module, name) in special:
            return special[(module, name)]
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            return lambda text, encoding="latin1": text.encode(encoding)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _stub_class(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise AdapterFileError(f"{self.path}: unexpected persistent record {pid!r}; {_FIX}")
        _tag, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            dtype = torch.uint8
        return StorageRef(str(key), dtype, int(numel))


@dataclass(frozen=True)
class _Record:
    """Where one zip member's bytes and CRC fields live in the file."""

    data_start: int
    size: int
    crc_fields: tuple[int, ...]


def _zip_records(path: Path) -> tuple[str, dict[str, _Record]]:
    """The archive prefix (``<name>/``) and the location of every stored member."""
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            infos = archive.infolist()
            central = archive.start_dir
            records: dict[str, _Record] = {}
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise AdapterFileError(f"{path}: member {info.filename} is compressed; {_FIX}")
                handle.seek(central)
                fixed = handle.read(46)
                if fixed[:4] != b"PK\x01\x02":
                    raise AdapterFileError(f"{path}: corrupted zip central directory; {_FIX}")
                name_len, extra_len, comment_len = struct.unpack("<HHH", fixed[28:34])
                crc_fields = [central + 16]
                central += 46 + name_len + extra_len + comment_len
                handle.seek(info.header_offset)
                local = handle.read(30)
                local_name, local_extra = struct.unpack("<HH", local[26:30])
                data_start = info.header_offset + 30 + local_name + local_extra
                if not info.flag_bits & 0x08:
                    crc_fields.append(info.header_offset + 14)
                else:  # the CRC lives in a data descriptor after the data (the local field stays 0)
                    handle.seek(data_start + info.compress_size)
                    descriptor = handle.read(4)
                    crc_fields.append(data_start + info.compress_size + (4 if descriptor == b"PK\x07\x08" else 0))
                records[info.filename] = _Record(data_start, info.file_size, tuple(crc_fields))
    except zipfile.BadZipFile:
        raise AdapterFileError(f"{path}: not a torch zip checkpoint (legacy or corrupted file); {_FIX}") from None
    pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise AdapterFileError(f"{path}: not a torch.save checkpoint (no single data.pkl); {_FIX}")
    return pickles[0][: -len("data.pkl")], records


def storage_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Byte position and length of every storage record's data in the file, by storage key
    (a :class:`TensorRef`'s values start at ``position + ref.offset * itemsize``)."""
    prefix, records = _zip_records(path)
    base = f"{prefix}data/"
    return {
        name[len(base) :]: (r.data_start, r.size) for name, r in records.items() if name.startswith(base) and "/" not in name[len(base) :]
    }


def read_structure(path: Path) -> Any:
    """The unpickled object tree of a ``torch.save`` file, with tensors as :class:`TensorRef`."""
    prefix, records = _zip_records(path)
    record = records[prefix + "data.pkl"]
    with path.open("rb") as handle:
        handle.seek(record.data_start)
        data = handle.read(record.size)
    try:
        return _StructureUnpickler(data, path).load()
    except AdapterFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a broken file
        raise AdapterFileError(f"{path}: cannot parse the checkpoint pickle ({type(exc).__name__}: {exc}); {_FIX}") from None


def _span(ref: TensorRef) -> int:
    """Number of storage elements a strided view touches, from its offset."""
    if any(s == 0 for s in ref.size):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))


def _entry(path: Path, records: Mapping[str, _Record], prefix: str, ref: TensorRef) -> _Record:
    name = f"{prefix}data/{ref.storage.key}"
    if name not in records:
        raise AdapterFileError(f"{path}: storage record {name} is missing; {_FIX}")
    record = records[name]
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    if (ref.offset + _span(ref)) * itemsize > record.size:
        raise AdapterFileError(f"{path}: storage record {name} is truncated; {_FIX}")
    return record


def read_tensor(path: Path, ref: TensorRef) -> torch.Tensor:
    """Read one tensor's values (a fresh CPU tensor) without loading anything else."""
    prefix, records = _zip_records(path)
    return _read_with(path, prefix, records, ref)


def read_tensors(path: Path, refs: Iterable[TensorRef]) -> list[torch.Tensor]:
    """Read several tensors of one file (one directory scan)."""
    prefix, records = _zip_records(path)
    return [_read_with(path, prefix, records, ref) for ref in refs]


def _read_with(path: Path, prefix: str, records: Mapping[str, _Record], ref: TensorRef) -> torch.Tensor:
    record = _entry(path, records, prefix, ref)
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    span = _span(ref)
    if span == 0:
        return torch.empty(ref.size, dtype=ref.dtype)
    with path.open("rb") as handle:
        handle.seek(record.data_start + ref.offset * itemsize)
        raw = bytearray(handle.read(span * itemsize))
    flat = torch.frombuffer(raw, dtype=ref.dtype)
    return flat.as_strided(ref.size, ref.stride).clone()


def _crc(handle: Any, record: _Record) -> int:
    handle.seek(record.data_start)
    crc, left = 0, record.size
    while left:
        chunk = handle.read(min(left, 1 << 24))
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def refresh_crcs(path: Path) -> None:
    """Recompute the CRC-32 of every member of ``path`` after tensor bytes were written into it in place
    (as :func:`patch_tensors` does for the records it changes), so the archive stays valid for zip tools."""
    _prefix, records = _zip_records(path)
    with path.open("r+b") as handle:
        for record in records.values():
            crc = struct.pack("<I", _crc(handle, record))
            for position in record.crc_fields:
                handle.seek(position)
                handle.write(crc)


def patch_tensors(src: Path, dst: Path, updates: Iterable[tuple[TensorRef, torch.Tensor]]) -> None:
    """Copy ``src`` to ``dst`` and overwrite the given tensors' values inside ``dst``.

    Each new value must have the shape of its :class:`TensorRef`; it is cast to the stored dtype.
    Views that share storage stay shared. ``src`` is only read.

    Raises:
        AdapterFileError: the file is not a torch zip checkpoint, or a shape does not match.
    """
    prefix, records = _zip_records(src)
    shutil.copyfile(src, dst)
    touched: dict[str, _Record] = {}
    with dst.open("r+b") as handle:
        for ref, value in updates:
            if tuple(value.shape) != ref.size:
                raise AdapterFileError(f"{src}: new value of shape {tuple(value.shape)} does not fit tensor of shape {ref.size}")
            record = _entry(src, records, prefix, ref)
            itemsize = torch.empty((), dtype=ref.dtype).element_size()
            span = _span(ref)
            if span == 0:
                continue
            start = record.data_start + ref.offset * itemsize
            handle.seek(start)
            raw = bytearray(handle.read(span * itemsize))
            flat = torch.frombuffer(raw, dtype=ref.dtype)
            flat.as_strided(ref.size, ref.stride).copy_(value.detach().to("cpu", ref.dtype))
            handle.seek(start)
            handle.write(raw)
            touched[ref.storage.key] = record
        for record in touched.values():
            crc = struct.pack("<I", _crc(handle, record))
            for position in record.crc_fields:
                handle.seek(position)
                handle.write(crc)
