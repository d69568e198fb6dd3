"""verl full-parameter runs: ``global_step_N/actor/model_world_size_W_rank_R.pt`` FSDP shards.

verl's ``FSDPCheckpointManager.save_checkpoint`` writes, per saved step and rank, the rank's
``model.state_dict()`` under ``SHARDED_STATE_DICT`` (FSDP1 with a device mesh, or FSDP2): every
parameter is a ``DTensor`` whose local tensor is this rank's ``torch.chunk`` of one dimension
(``Shard(d)``; FSDP2 with verl's ``get_shard_placement_fn`` picks the first dimension divisible
by the mesh size). Layouts (documented in ``docs/formats.md``):

- ``verl-fsdp``: the shards, read header-only: the pickle gives each local tensor's storage,
  offset, shape and its block of the global tensor, the zip directory the storage's byte
  position, so every parameter becomes :class:`~nextoffline.dense.layout.Piece` runs in the
  rank files (one per rank for ``Shard(0)``, one per row of the outer dimensions otherwise).
  The shards hold the fp32 parameters the optimizer updates (verl's actor keeps fp32
  parameters by default); the output model folder is written in the dtype verl itself exports:
  that of ``actor/huggingface/`` weights when the run saved them (``save_contents``
  ``hf_model``), else bf16 as ``python -m verl.model_merger merge`` writes.
- ``verl-hf``: no shards, only ``actor/huggingface/`` model weights per step: read as HF model folders.

``--resumable`` copies ``global_step_N/`` to ``resume/global_step_N/`` and writes the
extrapolated values into every rank's shard in place (same storages, offsets, dtype and
pickle), and into ``actor/huggingface/`` weights when present, so ``trainer.resume_mode=resume_path``
resumes from them; the optimizer moments, scheduler, RNG and dataloader state stay those of the
last real checkpoint.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch

from nextoffline.artifacts import RESUME_DIR
from nextoffline.dense.layout import (
    INDEX_NAME,
    SINGLE_NAME,
    DenseCheckpoint,
    DenseResume,
    DenseTrajectory,
    Piece,
    TensorEntry,
    WriteTarget,
    check_steps,
    check_trajectory,
    read_base,
    read_model_folder,
)
from nextoffline.errors import AdapterFileError, FormatDetectionError, OutputError
from nextoffline.formats.lora_keys import peft_key
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files
from nextoffline.formats.verl import LEGACY_ADAPTER_DIR, LORA_META_NAME, ShardEntry, model_shards, shard_tensors, step_dirs
from nextoffline.io.torch_zip import read_structure, refresh_crcs, storage_spans

__all__ = ["READER", "VerlFSDPReader", "block_pieces", "read_step"]

LOG = logging.getLogger(__name__)

SHARDS_LAYOUT = "verl-fsdp"
HF_LAYOUT = "verl-hf"
HF_DIR = "huggingface"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_SHARD_NAME = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
#: pieces of one tensor beyond which a ``Shard(d > 0)`` layout is refused (one piece per outer row and rank)
MAX_PIECES = 1 << 20
#: files of ``global_step_N/`` copied unchanged by ``--resumable``: no actor weights are loaded from them
_WEIGHTLESS = ("data.pt", "actor/optim_world_size_*_rank_*.pt", "actor/extra_state_world_size_*_rank_*.pt", "critic/*")


def _hf_weights(actor: Path) -> bool:
    return (actor / HF_DIR / SINGLE_NAME).is_file() or (actor / HF_DIR / INDEX_NAME).is_file()


def _shard_files(actor: Path) -> list[Path]:
    return sorted(actor.glob("model_world_size_*_rank_*.pt"))


def _lora_markers(actor: Path) -> bool:
    """verl's LoRA exports: ``lora_adapter/`` (<= 0.7), ``lora_train_meta.json`` (0.9), a PEFT ``huggingface/adapter/``."""
    return (actor / LEGACY_ADAPTER_DIR).is_dir() or (actor / LORA_META_NAME).is_file() or (actor / HF_DIR / "adapter").is_dir()


def _holds_lora(shard: Path) -> bool | None:
    """True when the shard's state dict has LoRA keys; None when it cannot be parsed (only the pickle is read)."""
    try:
        state = read_structure(shard)
    except AdapterFileError:
        return None
    return any(peft_key(str(key)) is not None for key in state) if isinstance(state, dict) else None


# --------------------------------------------------------------------------------- shard pieces


def _rank_files(actor: Path) -> list[Path]:
    """Every rank's ``model_world_size_W_rank_R.pt`` of one step, by rank; a missing one is named."""
    found = _shard_files(actor)
    worlds = sorted({int(m[1]) for m in (_SHARD_NAME.match(p.name) for p in found) if m})
    if len(worlds) != 1:
        raise AdapterFileError(f"{actor}: model shards of several world sizes {worlds}; keep the files of one run")
    world = worlds[0]
    for rank in range(world):
        path = actor / f"model_world_size_{world}_rank_{rank}.pt"
        if not path.is_file():
            raise AdapterFileError(
                f"{path}: missing (world size {world}); copy every rank's file, or move {actor.parent.name} out of the run"
            )
    return model_shards(actor)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _sharded_dims(entry: ShardEntry) -> list[int]:
    return [d for d, (lo, hi) in enumerate(entry.bounds) if (lo, hi) != (0, entry.global_shape[d])]


def _position(shard: Path, entry: ShardEntry, spans: dict[str, tuple[int, int]]) -> int:
    """Byte position of the local tensor's first element; it must be contiguous and inside its storage record."""
    ref = entry.ref
    stride = 1
    for size, got in zip(reversed(ref.size), reversed(ref.stride)):
        if size > 1 and got != stride:
            raise AdapterFileError(
                f"{shard}: the local tensor of {entry.state_key} is not contiguous (stride {ref.stride}); re-save it with verl"
            )
        stride *= size
    if ref.storage.key not in spans:
        raise AdapterFileError(f"{shard}: the storage record of {entry.state_key} is missing; the file is damaged, restore it")
    start, size = spans[ref.storage.key]
    if (ref.offset + _numel(ref.size)) * ref.dtype.itemsize > size:
        raise AdapterFileError(f"{shard}: the storage record of {entry.state_key} is truncated; the file is damaged, restore it")
    return start + ref.offset * ref.dtype.itemsize


def block_pieces(file: str, position: int, entry: ShardEntry) -> list[Piece]:
    """The runs of the flattened global tensor that one rank's contiguous local block holds.

    ``Shard(0)`` (and an unsharded tensor) is one run; ``Shard(d)`` one run per index of the
    dimensions before ``d``; an empty chunk (a rank holding nothing of a small tensor) none.
    """
    shape = entry.global_shape
    sharded = _sharded_dims(entry)
    if not sharded:
        numel = _numel(shape)
        return [Piece(file, position, 0, numel)] if numel else []
    if len(sharded) > 1:
        raise AdapterFileError(f"{file}: {entry.state_key} is sharded on dimensions {sharded}; FSDP shards one dimension")
    dim = sharded[0]
    lo, hi = entry.bounds[dim]
    inner = _numel(shape[dim + 1 :])
    run = (hi - lo) * inner
    if run == 0:
        return []
    itemsize = entry.ref.dtype.itemsize
    return [Piece(file, position + i * run * itemsize, (i * shape[dim] + lo) * inner, run) for i in range(_numel(shape[:dim]))]


def _assemble(folder: Path, key: str, blocks: list[tuple[Path, ShardEntry, list[Piece]]]) -> tuple[TensorEntry, list[TensorEntry]]:
    """One tensor's entry from every rank's block, plus the other ranks' copies of a tensor every rank holds whole."""
    shard0, first, _ = blocks[0]
    for shard, entry, _pieces in blocks[1:]:
        if entry.ref.dtype != first.ref.dtype or entry.global_shape != first.global_shape:
            raise AdapterFileError(
                f"{shard}: {key} is {entry.ref.dtype} {entry.global_shape}, {shard0.name} has {first.ref.dtype} {first.global_shape}; "
                "the shards come from different runs"
            )
    dtype, shape = first.ref.dtype, first.global_shape
    whole = [b for b in blocks if not _sharded_dims(b[1])]
    if len(blocks) > 1 and len(whole) == len(blocks):  # a plain tensor (or Replicate) saved by every rank
        copies = [TensorEntry(key, dtype, shape, tuple(p)) for _s, _e, p in blocks]
        return copies[0], copies[1:]
    pieces = sorted((p for _s, _e, ps in blocks for p in ps), key=lambda p: p.start)
    if any(a.start + a.numel > b.start for a, b in pairwise(pieces)):
        raise AdapterFileError(
            f"{folder / 'actor'}: several ranks hold the same elements of {key} (HSDP replicas or tensor parallelism); "
            "only FSDP over a 1-D mesh (ZeRO-3 style sharding, one copy of every element) is supported"
        )
    if len(pieces) > MAX_PIECES:
        raise AdapterFileError(
            f"{folder / 'actor'}: {key} is stored in {len(pieces)} pieces (sharded on an inner dimension); too many to stream"
        )
    entry = TensorEntry(key, dtype, shape, tuple(pieces))
    entry.check_pieces(folder / "actor")
    return entry, []


def read_step(step: int, folder: Path) -> tuple[DenseCheckpoint, dict[str, list[TensorEntry]]]:
    """Header-only read of ``global_step_N/``'s shards: the checkpoint, and per tensor every
    further rank's copy of tensors each rank saved whole (``--resumable`` rewrites them too)."""
    shards = _rank_files(folder / "actor")
    per_key: dict[str, list[tuple[Path, ShardEntry, list[Piece]]]] = {}
    for rank, shard in enumerate(shards):
        entries = shard_tensors(shard, rank)
        if per_key and set(entries) != set(per_key):
            raise AdapterFileError(f"{shard}: holds other tensors than {shards[0].name}; the shards come from different runs")
        spans = storage_spans(shard)
        name = shard.relative_to(folder).as_posix()
        for key, entry in entries.items():
            per_key.setdefault(key, []).append((shard, entry, block_pieces(name, _position(shard, entry, spans), entry)))
    entries, copies, first_of = {}, {}, {}
    for key, blocks in per_key.items():
        entry, extra = _assemble(folder, key, blocks)
        alias = first_of.setdefault((entry.pieces, entry.shape), key) if entry.pieces else key
        if alias != key:  # tied weights (lm_head = embed_tokens) share one storage: keep the first key, as save_pretrained does
            LOG.debug("%s: %s is tied to %s", folder, key, alias)
            continue
        entries[key], copies[key] = entry, extra
    files = tuple(s.relative_to(folder).as_posix() for s in shards)
    LOG.debug("%s: %d tensors in %d rank files", folder, len(entries), len(shards))
    return DenseCheckpoint(step=step, folder=folder, entries=entries, files=files), {k: v for k, v in copies.items() if v}


# --------------------------------------------------------------------------------- the reader


def _steps_with_weights(root: Path) -> tuple[str, list[tuple[int, Path]]]:
    """The layout and the step folders: shards when every step has them, else ``huggingface/`` weights."""
    steps = step_dirs(root)
    if not steps:
        raise FormatDetectionError(f"{root}: no global_step_N/actor/ folders; point at verl's trainer.default_local_dir")
    if all(_shard_files(d / "actor") for _s, d in steps):
        return SHARDS_LAYOUT, steps
    if all(_hf_weights(d / "actor") for _s, d in steps):
        return HF_LAYOUT, steps
    if any(_shard_files(d / "actor") for _s, d in steps):
        bad = next(d for _s, d in steps if not _shard_files(d / "actor"))
        what = "no model_world_size_W_rank_R.pt shards (other steps have them)"
    else:
        bad = next(d for _s, d in steps if not _hf_weights(d / "actor"))
        what = "no model_world_size_W_rank_R.pt shards and no huggingface/ model weights"
    raise AdapterFileError(f"{bad / 'actor'}: {what}; this step is incomplete: restore it or move it out of the run")


def _output_dtypes(latest: DenseCheckpoint) -> dict[str, torch.dtype]:
    """The dtype verl exports: its own ``huggingface/`` weights' when saved, else bf16 (``verl.model_merger``)."""
    actor = latest.folder / "actor"
    if _hf_weights(actor):
        exported = read_model_folder(actor / HF_DIR, latest.step).entries
        return {k: exported[k].dtype for k in latest.entries if k in exported}
    return {k: torch.bfloat16 for k, e in latest.entries.items() if e.dtype.is_floating_point and e.dtype != torch.bfloat16}


class VerlFSDPReader:
    """verl FSDP/FSDP2 full-parameter runs (``verl-fsdp`` shards, ``verl-hf`` exported weights only)."""

    name = "verl"
    layouts = (SHARDS_LAYOUT, HF_LAYOUT)

    def probe(self, root: Path) -> bool:
        """verl step folders whose actor holds full-parameter weights (LoRA runs go to the LoRA reader)."""
        steps = step_dirs(root)
        if not steps or any(_lora_markers(d / "actor") for _s, d in steps):
            return False
        for _step, folder in reversed(steps):
            shards = [p for p in _shard_files(folder / "actor") if p.name.endswith("_rank_0.pt")]
            lora = _holds_lora(shards[0]) if shards else None
            if lora is not None:
                return not lora
        return any(_shard_files(d / "actor") or _hf_weights(d / "actor") for _s, d in steps)

    def load(self, root: Path, *, base: Path | None, source_label: str | None, min_steps: int) -> DenseTrajectory:
        layout, steps = _steps_with_weights(root)
        check_steps(root, steps, min_steps)
        if layout == SHARDS_LAYOUT:
            checkpoints = tuple(read_step(s, d)[0] for s, d in steps)
        else:
            checkpoints = tuple(read_model_folder(d / "actor" / HF_DIR, s) for s, d in steps)
        base_ckpt = read_base(base)
        check_trajectory(checkpoints, base_ckpt)
        latest = checkpoints[-1]
        return DenseTrajectory(
            source=root,
            source_label=source_label or str(root),
            layout=layout,
            checkpoints=checkpoints,
            base=base_ckpt,
            model_files_dir=steps[-1][1] / "actor" / HF_DIR,
            output_dtypes=_output_dtypes(latest) if layout == SHARDS_LAYOUT else {},
        )

    def resumable(self, trajectory: DenseTrajectory) -> DenseResume:
        """``resume/global_step_N/``: the latest step with every rank's shard (and ``huggingface/`` weights) rewritten.

        Raises:
            OutputError: only ``huggingface/`` weights were saved (verl resumes from the shards).
            UnhandledCheckpointError: a weight-bearing file it would copy unchanged (no-silent-loss rule).
        """
        latest = trajectory.latest
        if trajectory.layout != SHARDS_LAYOUT:
            raise OutputError(
                f"{latest.folder.parent.parent}: no model_world_size_W_rank_R.pt shards; verl resumes only from them "
                "(save_contents must include 'model'): drop --resumable and load the model folder instead"
            )
        folder = latest.folder
        checkpoint, copies = read_step(latest.step, folder)
        target = f"{RESUME_DIR}/{folder.name}"
        targets = [WriteTarget(target, checkpoint.entries)]
        for i in range(max((len(c) for c in copies.values()), default=0)):
            targets.append(WriteTarget(target, {k: c[i] for k, c in copies.items() if len(c) > i}))
        rewritten = {folder / name for name in checkpoint.files}
        actor = folder / "actor"
        if _hf_weights(actor):
            exported = read_model_folder(actor / HF_DIR, latest.step)
            _check_export(actor / HF_DIR, exported, checkpoint)
            targets.append(WriteTarget(f"{target}/actor/{HF_DIR}", exported.entries))
            rewritten |= {actor / HF_DIR / name for name in exported.files}
        check_resume_files(
            ResumeFiles(
                folder,
                "verl FSDP full-parameter",
                frozenset(rewritten),
                _WEIGHTLESS,
                "verl FSDP/FSDP2 model_world_size_W_rank_R.pt shards over a 1-D mesh and actor/huggingface/ safetensors weights",
            )
        )
        world = len(checkpoint.files)
        return DenseResume(
            finalize=partial(_refresh_shards, checkpoint.files),
            copy_from=folder,
            copy_to=target,
            targets=targets,
            info={
                "checkpoint_dir": target,
                "command": "python -m verl.trainer.main_ppo <your training overrides> trainer.resume_mode=resume_path "
                f"trainer.resume_from_path=<out>/{target}",
                "notes": [
                    f"the resumed run continues at step {latest.step}: optimizer moments, lr scheduler, RNG and dataloader "
                    "state are those of the last real checkpoint; the parameters in every model_world_size_*_rank_*.pt "
                    "shard (and huggingface/ weights, when saved) are the extrapolated ones",
                    f"resume with the same world size ({world} GPUs) and FSDP strategy: verl loads model_world_size_{world}_rank_R.pt",
                    "for trainer.resume_mode=auto, point trainer.default_local_dir at <out>/resume and write "
                    f"{latest.step} to <out>/resume/latest_checkpointed_iteration.txt",
                ],
            },
        )


def _refresh_shards(files: tuple[str, ...], copy: Path) -> None:
    """The rank files' zip CRCs after their parameter bytes were overwritten in place."""
    for name in files:
        refresh_crcs(copy / name)


def _check_export(folder: Path, exported: DenseCheckpoint, shards: DenseCheckpoint) -> None:
    """``huggingface/`` weights must be the shards' tensors (same keys and shapes) to be rewritten with them."""
    for key, entry in exported.entries.items():
        if key not in shards.entries or shards.entries[key].shape != entry.shape:
            raise OutputError(
                f"{folder}: exported tensor {key} is not among the FSDP shards' parameters; --resumable cannot rewrite "
                "these weights: remove huggingface/model*.safetensors from the checkpoint or drop --resumable"
            )


READER = VerlFSDPReader()
