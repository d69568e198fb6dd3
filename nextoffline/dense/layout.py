"""Discover full-parameter trajectories: step-named folders holding a whole HF model.

Two layouts are recognised by probing (documented in ``docs/formats.md``):

- ``hf-trainer``: Hugging Face ``Trainer`` / TRL without PEFT, ``checkpoint-N/`` folders with
  ``model.safetensors`` or sharded ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json`` (and ``optimizer.pt``, ``trainer_state.json`` ...);
- ``hf-steps``: plain HF model folders named by step (``step_N``, ``global_step_N``, ``iter_N``).

Only safetensors headers are read here; :class:`DenseTrajectory` records, per checkpoint, where
every tensor's bytes sit (:class:`Piece` runs of its flattened elements, in one file or spread
over several, as trainers that shard parameters store them), so the pipeline can read row slabs
of one tensor at a time. Other trainers' layouts plug in as :class:`DenseReader` modules listed in
:data:`READER_MODULES`, tried in order by :func:`load_dense_trajectory`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from nextoffline.artifacts import ADAPTER_CONFIG_NAME
from nextoffline.errors import AdapterFileError, FormatDetectionError, IncompatibleCheckpointsError, NotEnoughCheckpointsError
from nextoffline.formats.base import parse_step_dir
from nextoffline.io.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header

__all__ = [
    "INDEX_NAME",
    "READER_MODULES",
    "SINGLE_NAME",
    "DenseCheckpoint",
    "DenseReader",
    "DenseResume",
    "DenseTrajectory",
    "Piece",
    "TensorEntry",
    "WriteTarget",
    "is_full_parameter_run",
    "load_dense_trajectory",
    "read_model_folder",
    "up_to_step",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Piece:
    """A run of a tensor's flattened elements ``[start, start + numel)`` stored contiguously in
    ``file`` (a path relative to the checkpoint's folder) from byte ``offset`` on."""

    file: str
    offset: int
    start: int
    numel: int


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: its ``pieces`` cover the flattened tensor in order, without gaps."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        out = 1
        for dim in self.shape:
            out *= dim
        return out

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def contiguous(cls, key: str, dtype: torch.dtype, shape: tuple[int, ...], file: str, offset: int) -> TensorEntry:
        """An entry stored in one run of bytes (a safetensors tensor)."""
        entry = cls(key, dtype, shape, ())
        return cls(key, dtype, shape, (Piece(file, offset, 0, entry.numel),))

    def check_pieces(self, where: Path) -> None:
        """Raise :class:`AdapterFileError` unless the pieces tile ``[0, numel)`` in order."""
        position = 0
        for piece in self.pieces:
            if piece.start != position or piece.numel < 0:
                break
            position += piece.numel
        if position != self.numel:
            raise AdapterFileError(
                f"{where}: tensor {self.key} is stored in pieces that do not cover its {self.numel} elements; "
                "the checkpoint is incomplete (a rank's file missing?): restore it or drop this checkpoint"
            )


@dataclass(frozen=True)
class WriteTarget:
    """Tensors to write the extrapolated values into: ``entries`` (their pieces relative to
    ``root``, a folder relative to the output folder) in their own stored dtypes. The files must
    exist at their full size before the write pass (created from a plan, or copied)."""

    root: str
    entries: dict[str, TensorEntry]


@dataclass(frozen=True)
class DenseCheckpoint:
    """One saved model: its folder, step, and the position of every tensor."""

    step: int
    folder: Path
    entries: dict[str, TensorEntry]
    files: tuple[str, ...]  # weight files, relative to the folder
    header_bytes: dict[str, int] = field(default_factory=dict)  # safetensors file -> length of its header (8 + JSON)

    @property
    def is_safetensors(self) -> bool:
        """True when every weight file is a safetensors file (the output can mirror its layout)."""
        return bool(self.files) and set(self.files) == set(self.header_bytes)


@dataclass(frozen=True)
class DenseTrajectory:
    """A full-parameter trajectory: checkpoints (sorted by step) and the optional base model."""

    source: Path
    source_label: str
    layout: str
    checkpoints: tuple[DenseCheckpoint, ...]
    base: DenseCheckpoint | None
    #: folder whose config/tokenizer/generation-config files go into the output model folder
    #: (default: the latest checkpoint's folder)
    model_files_dir: Path | None = None
    #: ``--base`` as the user gave it (e.g. an ``hf://`` spec downloaded into the cache)
    base_label: str | None = None
    #: stored dtype of each tensor in the output model folder when it differs from the source
    #: (e.g. bf16 model weights read from fp32 optimizer masters)
    output_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    #: where a faithful (fp32) copy was looked for and not found, when the trajectory is read from 16-bit
    #: weights: replaces the generic advice of the measured bf16 resolution warning
    precision_note: str | None = None

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

    @property
    def reference_label(self) -> str:
        """The reference model as the user named it (``--base``), or the earliest checkpoint."""
        if self.base is not None:
            return self.base_label or str(self.base.folder)
        return f"earliest checkpoint (step {self.step_numbers[0]})"

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.latest.entries.values())

    def output_dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key`` in the output model folder."""
        return self.output_dtypes.get(key, self.latest.entries[key].dtype)


@dataclass
class DenseResume:
    """How ``--resumable`` rewrites the trainer's own checkpoint.

    ``copy_from`` (the latest checkpoint's folder, or a folder above it) is copied whole to
    ``copy_to`` (relative to the output folder); the write pass then writes the extrapolated
    values into every ``targets`` entry of the copy (weights, and fp32 masters where the trainer
    keeps them). ``info`` goes to the manifest (``checkpoint_dir``, ``command``, ``notes``).
    ``finalize`` (optional) runs once on the written copy's folder after the write pass (e.g. to
    refresh the CRCs of torch zip files whose tensor bytes were overwritten in place).
    """

    copy_from: Path
    copy_to: str
    targets: list[WriteTarget]
    info: dict[str, Any]
    finalize: Callable[[Path], None] | None = None


class DenseReader(Protocol):
    """One trainer's full-parameter layout (probing, loading, and its ``--resumable`` writer)."""

    name: str
    layouts: tuple[str, ...]  # the DenseTrajectory.layout values it produces

    def probe(self, root: Path) -> bool:
        """True when ``root`` looks like a run of this layout (cheap: names and headers only)."""
        ...

    def load(self, root: Path, *, base: Path | None, source_label: str | None, min_steps: int) -> DenseTrajectory:
        """Read every checkpoint's layout (headers only)."""
        ...

    def resumable(self, trajectory: DenseTrajectory) -> DenseResume:
        """The resume plan, or raise :class:`~nextoffline.errors.OutputError` (or
        :class:`~nextoffline.errors.UnhandledCheckpointError` via ``check_resume_files``) naming the file."""
        ...


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
        entries[key] = TensorEntry.contiguous(key, dtype, tuple(spec["shape"]), name, header.data_start + begin)
        if entries[key].nbytes != end - begin:
            raise AdapterFileError(
                f"{path}: tensor {key} has {end - begin} bytes for shape {spec['shape']}; the file is damaged, re-save it"
            )
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


def check_steps(root: Path, found: list[tuple[int, Path]], min_steps: int) -> None:
    """Refuse duplicate steps and runs with fewer than ``min_steps`` checkpoints (one line naming ``root``)."""
    steps = [s for s, _ in found]
    if len(set(steps)) != len(steps):
        raise IncompatibleCheckpointsError(f"{root}: a step appears twice among {[f.name for _, f in found]}; keep one folder per step")
    if len(found) < min_steps:
        raise NotEnoughCheckpointsError(
            f"{root}: found {len(found)} full-parameter checkpoint(s) (steps {steps}); at least {min_steps} are needed"
        )


def check_trajectory(checkpoints: tuple[DenseCheckpoint, ...], base: DenseCheckpoint | None) -> None:
    """Every checkpoint (and the base) holds the same tensors with the same shapes as the latest."""
    for other in checkpoints[:-1]:
        _check_compatible(checkpoints[-1], other, "checkpoint")
    if base is not None:
        _check_compatible(checkpoints[-1], base, "the base model")


def read_base(base: Path | None) -> DenseCheckpoint | None:
    """``--base``: an HF model folder (the step-0 model) read header-only."""
    if base is None:
        return None
    if not base.is_dir():
        raise FormatDetectionError(f"{base}: --base must be a Hugging Face model folder (the step-0 model)")
    return read_model_folder(base, 0)


class HFModelFolders:
    """HF Trainer ``checkpoint-N/`` and plain step-named HF model folders (``hf-trainer``, ``hf-steps``)."""

    name = "hf"
    layouts = ("hf-trainer", "hf-steps")

    def probe(self, root: Path) -> bool:
        return is_full_parameter_run(root)

    def load(self, root: Path, *, base: Path | None, source_label: str | None, min_steps: int) -> DenseTrajectory:
        return _load_hf_folders(root, base=base, source_label=source_label, min_steps=min_steps)

    def resumable(self, trajectory: DenseTrajectory) -> DenseResume:
        from nextoffline.dense.output import hf_trainer_resume

        return hf_trainer_resume(trajectory)


#: Modules of trainer-specific full-parameter readers, each exposing ``READER`` (a :class:`DenseReader`);
#: probed in this order, before the HF folders (other trainers may save HF weights beside their own states).
READER_MODULES: tuple[str, ...] = (
    "nextoffline.dense.verl_fsdp",
    "nextoffline.dense.deepspeed_states",  # OpenRLHF / HF Trainer DeepSpeed states (fp32 masters)
)


def dense_readers() -> list[DenseReader]:
    """Every full-parameter reader, in probing order (imported on first use)."""
    return [*(importlib.import_module(name).READER for name in READER_MODULES), HFModelFolders()]


def reader_of(trajectory: DenseTrajectory) -> DenseReader:
    """The reader that loaded ``trajectory`` (by its ``layout``)."""
    for reader in dense_readers():
        if trajectory.layout in reader.layouts:
            return reader
    raise FormatDetectionError(f"{trajectory.source}: no full-parameter reader for layout {trajectory.layout}")


def is_dense_source(root: Path) -> bool:
    """True when any full-parameter reader recognises ``root``."""
    return root.is_dir() and any(reader.probe(root) for reader in dense_readers())


def load_dense_trajectory(
    root: Path, *, base: Path | None = None, source_label: str | None = None, min_steps: int = 3, max_step: int | None = None
) -> DenseTrajectory:
    """Probe ``root`` with every reader (:func:`dense_readers`) and read the checkpoints of the first that fits
    (those saved after ``max_step`` are dropped: a run that is still training).

    Raises:
        FormatDetectionError: no reader recognises ``root``.
        NotEnoughCheckpointsError: fewer than ``min_steps`` checkpoints (up to ``max_step``).
        IncompatibleCheckpointsError: checkpoints (or the base) disagree on tensors or shapes.
    """
    for reader in dense_readers():
        if root.is_dir() and reader.probe(root):
            trajectory = reader.load(root, base=base, source_label=source_label, min_steps=min_steps)
            break
    else:
        trajectory = _load_hf_folders(root, base=base, source_label=source_label, min_steps=min_steps)  # its error names what is missing
    return trajectory if max_step is None else up_to_step(trajectory, max_step, min_steps)


def up_to_step(trajectory: DenseTrajectory, max_step: int, min_steps: int = 3) -> DenseTrajectory:
    """``trajectory`` without the checkpoints saved after ``max_step`` (``--max-step``).

    The model files (config, tokenizer) then come from the new latest checkpoint's folder, at
    the same place relative to it when the reader took them from inside the latest folder.

    Raises:
        NotEnoughCheckpointsError: fewer than ``min_steps`` checkpoints remain.
    """
    kept = tuple(c for c in trajectory.checkpoints if c.step <= max_step)
    if len(kept) == len(trajectory.checkpoints):
        return trajectory
    if len(kept) < min_steps:
        raise NotEnoughCheckpointsError(
            f"{trajectory.source}: found {len(kept)} full-parameter checkpoint(s) up to --max-step {max_step} "
            f"(steps {[c.step for c in kept]}); at least {min_steps} are needed"
        )
    files_dir = trajectory.model_files_dir
    old_latest = trajectory.latest.folder
    if files_dir is not None and files_dir.is_relative_to(old_latest):
        files_dir = kept[-1].folder / files_dir.relative_to(old_latest)
    return replace(trajectory, checkpoints=kept, model_files_dir=files_dir)


def _load_hf_folders(root: Path, *, base: Path | None, source_label: str | None, min_steps: int) -> DenseTrajectory:
    """Step-named HF model folders under ``root``, header-only.

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
    check_steps(root, folders, min_steps)
    checkpoints = tuple(read_model_folder(f, s) for s, f in sorted(folders))
    base_ckpt = read_base(base)
    check_trajectory(checkpoints, base_ckpt)
    all_trainer = all(c.folder.name.startswith("checkpoint-") for c in checkpoints)
    return DenseTrajectory(
        source=root,
        source_label=source_label or str(root),
        layout="hf-trainer" if all_trainer else "hf-steps",
        checkpoints=checkpoints,
        base=base_ckpt,
    )
