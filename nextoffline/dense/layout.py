"""Discover full-parameter trajectories: step-named folders holding a whole HF model.

Two layouts are recognised by probing (documented in ``docs/formats.md``):

- ``hf-trainer``: Hugging Face ``Trainer`` / TRL without PEFT, ``checkpoint-N/`` folders with
  ``model.safetensors`` or sharded ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json`` (and ``optimizer.pt``, ``trainer_state.json`` ...);
- ``hf-steps``: plain HF model folders named by step (``step_N``, ``global_step_N``, ``iter_N``).

Only safetensors headers are read here; :class:`DenseTrajectory` records, per checkpoint, where
every tensor's bytes sit, so the pipeline can read row slabs of one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nextoffline.artifacts import ADAPTER_CONFIG_NAME
from nextoffline.errors import AdapterFileError, FormatDetectionError, IncompatibleCheckpointsError, NotEnoughCheckpointsError
from nextoffline.formats.base import parse_step_dir
from nextoffline.io.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "DenseCheckpoint",
    "DenseTrajectory",
    "TensorEntry",
    "is_full_parameter_run",
    "load_dense_trajectory",
    "read_model_folder",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file`` (name inside the folder), absolute byte ``offset``."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        out = 1
        for dim in self.shape:
            out *= dim
        return out


@dataclass(frozen=True)
class DenseCheckpoint:
    """One saved model: its folder, step, and the position of every tensor."""

    step: int
    folder: Path
    entries: dict[str, TensorEntry]
    files: tuple[str, ...]  # weight files, as named in the folder
    header_bytes: dict[str, int]  # file -> length of its header (8 + JSON)

    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.files]


@dataclass(frozen=True)
class DenseTrajectory:
    """A full-parameter trajectory: checkpoints (sorted by step) and the optional base model."""

    source: Path
    source_label: str
    layout: str
    checkpoints: tuple[DenseCheckpoint, ...]
    base: DenseCheckpoint | None

    @property
    def step_numbers(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    @property
    def latest(self) -> DenseCheckpoint:
        return self.checkpoints[-1]

    @property
    def keys(self) -> list[str]:
        """Tensor keys in a canonical order (sorted): the order of every per-tensor result."""
        return sorted(self.latest.entries)

    @property
    def reference(self) -> DenseCheckpoint:
        """The model global deltas are taken against: the base, else the earliest checkpoint."""
        return self.base if self.base is not None else self.checkpoints[0]

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.latest.entries.values())


def _has_model_weights(folder: Path) -> bool:
    return (folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file()


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    found = []
    for child in sorted(root.iterdir()):
        step = parse_step_dir(child.name) if child.is_dir() else None
        if step is not None and not (child / ADAPTER_CONFIG_NAME).exists():
            found.append((step, child))
    return found


def is_full_parameter_run(root: Path) -> bool:
    """True when ``root`` holds step-named folders with whole HF models (and no LoRA adapters)."""
    if not root.is_dir():
        return False
    return any(_has_model_weights(folder) or any((folder / n).is_file() for n in _BIN_NAMES) for _step, folder in _step_folders(root))


def _entries_of_file(path: Path, name: str) -> tuple[dict[str, TensorEntry], int]:
    header = read_safetensors_header(path)
    entries = {}
    for key, spec in header.tensors.items():
        begin, end = spec["data_offsets"]
        dtype = SAFETENSORS_DTYPES[spec["dtype"]]
        entries[key] = TensorEntry(key, dtype, tuple(spec["shape"]), name, header.data_start + begin, end - begin)
    return entries, header.data_start


def read_model_folder(folder: Path, step: int) -> DenseCheckpoint:
    """Header-only read of one HF model folder (single file or sharded with an index).

    Raises:
        FormatDetectionError: the folder holds only ``pytorch_model.bin`` weights.
        AdapterFileError: an index names a missing shard, or a file is not valid safetensors.
    """
    if (folder / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise AdapterFileError(f"{folder / INDEX_NAME}: not a safetensors index (no weight_map); re-save the model") from None
        files = tuple(sorted(set(weight_map.values())))
    elif (folder / SINGLE_NAME).is_file():
        weight_map, files = None, (SINGLE_NAME,)
    elif any((folder / n).is_file() for n in _BIN_NAMES):
        raise FormatDetectionError(
            f"{folder}: weights are saved as pytorch_model.bin; full-parameter trajectories are read from safetensors: "
            "re-save with save_pretrained(..., safe_serialization=True)"
        )
    else:
        raise FormatDetectionError(f"{folder}: no model.safetensors or {INDEX_NAME}; point --base/SOURCE at a Hugging Face model folder")
    entries: dict[str, TensorEntry] = {}
    header_bytes = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise AdapterFileError(f"{path}: shard named by {INDEX_NAME} is missing; restore it or re-save the checkpoint")
        found, header_bytes[name] = _entries_of_file(path, name)
        entries.update(found)
    if weight_map is not None and set(weight_map) != set(entries):
        missing = sorted(set(weight_map) - set(entries))[:3]
        raise AdapterFileError(f"{folder / INDEX_NAME}: weight_map names tensors absent from the shards ({missing}); re-save the model")
    return DenseCheckpoint(step=step, folder=folder, entries=entries, files=files, header_bytes=header_bytes)


def _check_compatible(reference: DenseCheckpoint, other: DenseCheckpoint, what: str) -> None:
    if set(reference.entries) != set(other.entries):
        diff = sorted(set(reference.entries) ^ set(other.entries))[:3]
        raise IncompatibleCheckpointsError(
            f"{other.folder}: {what} has other tensors than {reference.folder} (e.g. {diff}); use checkpoints of one model"
        )
    for key, entry in reference.entries.items():
        if other.entries[key].shape != entry.shape:
            raise IncompatibleCheckpointsError(
                f"{other.folder}: tensor {key} has shape {other.entries[key].shape}, {reference.folder} has {entry.shape}; "
                "use checkpoints of one model"
            )


def load_dense_trajectory(root: Path, *, base: Path | None = None, source_label: str | None = None, min_steps: int = 3) -> DenseTrajectory:
    """Probe ``root`` for a full-parameter trajectory and read every checkpoint's header.

    Raises:
        FormatDetectionError: no step-named model folder under ``root``.
        NotEnoughCheckpointsError: fewer than ``min_steps`` checkpoints.
        IncompatibleCheckpointsError: checkpoints (or the base) disagree on tensors or shapes.
    """
    folders = [(s, f) for s, f in _step_folders(root) if _has_model_weights(f) or any((f / n).is_file() for n in _BIN_NAMES)]
    if not folders:
        raise FormatDetectionError(
            f"{root}: no step-named folder (checkpoint-N, step_N, global_step_N, iter_N) holding model.safetensors; "
            "point at the run folder of a full-parameter training"
        )
    steps = [s for s, _ in folders]
    if len(set(steps)) != len(steps):
        raise IncompatibleCheckpointsError(f"{root}: a step appears twice among {[f.name for _, f in folders]}; keep one folder per step")
    if len(folders) < min_steps:
        raise NotEnoughCheckpointsError(
            f"{root}: found {len(folders)} full-parameter checkpoint(s) (steps {steps}); at least {min_steps} are needed"
        )
    checkpoints = tuple(read_model_folder(f, s) for s, f in sorted(folders))
    for other in checkpoints[:-1]:
        _check_compatible(checkpoints[-1], other, "checkpoint")
    base_ckpt = None
    if base is not None:
        if not base.is_dir():
            raise FormatDetectionError(f"{base}: --base must be a Hugging Face model folder (the step-0 model)")
        base_ckpt = read_model_folder(base, 0)
        _check_compatible(checkpoints[-1], base_ckpt, "the base model")
    all_trainer = all(c.folder.name.startswith("checkpoint-") for c in checkpoints)
    return DenseTrajectory(
        source=root,
        source_label=source_label or str(root),
        layout="hf-trainer" if all_trainer else "hf-steps",
        checkpoints=checkpoints,
        base=base_ckpt,
    )
