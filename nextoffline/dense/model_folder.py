"""The output HF model folder of a full-parameter extrapolation: which weight files, where each tensor goes.

Two plans, chosen by :func:`plan_model_folder`:

- **mirror**: the latest checkpoint is an HF folder of safetensors files and every tensor keeps its
  dtype: the output has the same files, headers and index (so the same sharding and key order);
- **fresh**: any other source (a trainer's sharded ``.pt`` states, fp32 masters written as bf16 ...):
  new safetensors files in HF's layout (one ``model.safetensors``, or ``model-0000i-of-0000n``
  shards of at most :data:`MAX_SHARD_BYTES` plus ``model.safetensors.index.json``).

Either way rank 0 creates every file at its full size with its header (:meth:`ModelFolderPlan.create`)
and each process then writes its tensors' bytes in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextoffline.dense.layout import INDEX_NAME, SINGLE_NAME, DenseTrajectory, TensorEntry, WriteTarget
from nextoffline.io.safetensors_header import SAFETENSORS_DTYPES
from nextoffline.io.writer import copy_file, write_json

__all__ = ["MAX_SHARD_BYTES", "ModelFolderPlan", "PlannedFile", "copy_model_files", "plan_model_folder"]

#: transformers' default ``max_shard_size`` ("5GB", decimal)
MAX_SHARD_BYTES = 5_000_000_000

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
#: files of a trainer checkpoint that are training state or weights in another format, never copied as model files
_TRAINER_STATE = frozenset({"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp")
_INDEX_NAMES = frozenset({INDEX_NAME, "pytorch_model.bin.index.json"})


@dataclass(frozen=True)
class PlannedFile:
    """One output weight file: its name, header bytes (8-byte length + JSON) and full size."""

    name: str
    header: bytes
    size: int


@dataclass(frozen=True)
class ModelFolderPlan:
    """The weight files of the output model folder and where each tensor's bytes go."""

    files: tuple[PlannedFile, ...]
    entries: dict[str, TensorEntry]
    index: dict[str, Any] | None  # written as model.safetensors.index.json (fresh, sharded)
    mirrored: bool

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def target(self, root: str = "") -> WriteTarget:
        """The write target of this plan in ``root`` (relative to the output folder)."""
        return WriteTarget(root, self.entries)

    def create(self, folder: Path) -> None:
        """Create every weight file with its header, extended to its full size (and the index when fresh)."""
        folder.mkdir(parents=True, exist_ok=True)
        for planned in self.files:
            with (folder / planned.name).open("wb") as handle:
                handle.write(planned.header)
                handle.truncate(planned.size)
        if self.index is not None:
            write_json(folder / INDEX_NAME, self.index)


def plan_model_folder(trajectory: DenseTrajectory, max_shard_bytes: int = MAX_SHARD_BYTES) -> ModelFolderPlan:
    """Mirror the latest checkpoint's safetensors files when possible, else lay out fresh HF shards."""
    latest = trajectory.latest
    if latest.is_safetensors and not any(trajectory.output_dtype(k) != e.dtype for k, e in latest.entries.items()):
        return _mirror(trajectory)
    shapes = {key: (trajectory.output_dtype(key), latest.entries[key].shape) for key in trajectory.keys}
    return fresh_plan(shapes, max_shard_bytes)


def _mirror(trajectory: DenseTrajectory) -> ModelFolderPlan:
    latest = trajectory.latest
    files = []
    for name in latest.files:
        path = latest.folder / name
        with path.open("rb") as handle:
            header = handle.read(latest.header_bytes[name])
        files.append(PlannedFile(name, header, path.stat().st_size))
    return ModelFolderPlan(tuple(files), dict(latest.entries), None, mirrored=True)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


def _shards(shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    """Keys in order, cut greedily into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, (dtype, shape) in shapes.items():
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _header(keys: list[str], shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Safetensors header (length prefix + JSON padded to 8 bytes) and each key's data offsets."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, position = {}, 0
    for key in keys:
        dtype, shape = shapes[key]
        end = position + _nbytes(dtype, shape)
        meta[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [position, end]}
        offsets[key] = (position, end)
        position = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def fresh_plan(shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int = MAX_SHARD_BYTES) -> ModelFolderPlan:
    """New safetensors files for ``shapes`` (key -> (dtype, shape), in the order to store them)."""
    shards = _shards(shapes, max_shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files, entries, weight_map = [], {}, {}
    for name, keys in zip(names, shards, strict=True):
        header, offsets = _header(keys, shapes)
        for key in keys:
            dtype, shape = shapes[key]
            entries[key] = TensorEntry.contiguous(key, dtype, shape, name, len(header) + offsets[key][0])
            weight_map[key] = name
        files.append(PlannedFile(name, header, len(header) + (offsets[keys[-1]][1] if keys else 0)))
    index = None
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(*shapes[k]) for k in shapes)}, "weight_map": weight_map}
    return ModelFolderPlan(tuple(files), entries, index, mirrored=False)


def copy_model_files(source: Path, folder: Path, plan: ModelFolderPlan) -> list[str]:
    """Copy config, tokenizer and generation config from ``source`` into ``folder``: every top-level
    file that is neither a weight file, an index the plan replaces, nor trainer state."""
    planned = {f.name for f in plan.files}
    copied = []
    for child in sorted(source.iterdir()):
        name = child.name
        if not child.is_file() or name in planned or name in _TRAINER_STATE or (name.startswith("rng_state") and name.endswith(".pth")):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or (name in _INDEX_NAMES and not plan.mirrored):
            continue
        copy_file(child, folder / name)
        copied.append(name)
    return copied
