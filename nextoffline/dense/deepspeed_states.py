"""Full-parameter DeepSpeed states: OpenRLHF ``_actor/global_stepN/`` and HF Trainer ``checkpoint-N/global_stepN/``.

Read from DeepSpeed 0.19.8 (``runtime/engine.py`` ``save_checkpoint``/``_save_zero_checkpoint``/
``_get_zero_param_shapes``, ``runtime/zero/stage_1_and_2.py`` ``state_dict``, ``runtime/bf16_optimizer.py``,
``runtime/zero/stage3.py``, ``utils/zero_to_fp32.py``), OpenRLHF at 3c3be62 (v0.11: ``ppo_actor.save_checkpoint``,
``DeepspeedStrategy.save_ckpt/save_model``) and transformers 5.24 (``Trainer._save_checkpoint``); layout in
``docs/formats.md``. A DeepSpeed tag folder holds the bf16 module (``mp_rank_00_model_states.pt``; ZeRO-3:
empty placeholders in ``zero_pp_rank_R_mp_rank_00_model_states.pt``) and, per data-parallel rank, the
fp32 master partition (``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``). RL updates per step are
often below bf16 resolution, so each parameter is read from its fp32 master: a :class:`Piece` per rank
partition it spans (ZeRO-1/2: the group flattened in ``param_shapes`` order with DeepSpeed's alignment
paddings, split over ranks; ZeRO-3: ``ceil(numel / W)`` values per rank). Only the pickles are read
(:func:`~nextoffline.io.torch_zip.read_structure`); the values are streamed later at their byte offsets.
When a step has no optimizer states, every step is read from the bf16 weights instead and the measured
resolution warning says where the masters were looked for. ``--resumable`` copies the latest tag (HF
Trainer: the whole ``checkpoint-N``) and writes the extrapolated values into the masters of every rank,
the bf16 module and ``model.safetensors``; DeepSpeed's ``engine.load_checkpoint`` resumes from it.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, RESUME_DIR
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
from nextoffline.errors import AdapterFileError, FormatDetectionError, OutputError, UnsupportedAdapterError
from nextoffline.formats.base import parse_step_dir
from nextoffline.formats.deepspeed_zero3 import MasterPiece, is_zero3_tag, zero3_pieces
from nextoffline.formats.openrlhf import ANY_MODEL_STATES, DS_TAG, HF_DIR_PATTERN, MODEL_STATES, OPTIM_STATES, zero12_master_pieces
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files
from nextoffline.formats.trl import TRAINER_WEIGHTLESS
from nextoffline.io.torch_zip import TensorRef, read_structure, refresh_crcs, storage_spans

__all__ = ["READER", "DeepSpeedStates"]

LOG = logging.getLogger(__name__)

OPENRLHF = "openrlhf-deepspeed"
TRAINER = "hf-trainer-deepspeed"


@dataclass(frozen=True)
class _Step:
    """One saved step: its DeepSpeed tag folder (``None`` when rotated away) and HF model folder."""

    step: int
    tag_dir: Path | None
    folder: Path  # the step's own folder (checkpoint-N, or the tag / _hf folder for OpenRLHF)
    hf_dir: Path | None  # config, tokenizer and bf16 weights of this step


def _is_tag(folder: Path) -> bool:
    return folder.is_dir() and any(ANY_MODEL_STATES.match(p.name) for p in folder.iterdir())


def _has_weights(folder: Path) -> bool:
    return (folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file()


def _trainer_tag(checkpoint: Path) -> Path | None:
    """The DeepSpeed tag of an HF Trainer checkpoint: the one ``latest`` names, else the only ``global_step*``."""
    latest = checkpoint / "latest"
    if latest.is_file() and _is_tag(checkpoint / latest.read_text(encoding="utf-8").strip()):
        return checkpoint / latest.read_text(encoding="utf-8").strip()
    tags = [c for c in sorted(checkpoint.iterdir()) if DS_TAG.match(c.name) and _is_tag(c)]
    return tags[0] if len(tags) == 1 else None


def _trainer_steps(root: Path) -> list[_Step]:
    found = []
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        step = parse_step_dir(child.name)
        if step is None or not child.name.startswith("checkpoint-") or not child.is_dir() or (child / ADAPTER_CONFIG_NAME).exists():
            continue
        tag = _trainer_tag(child)
        if tag is not None or _has_weights(child):
            found.append(_Step(step, tag, child, child if _has_weights(child) else None))
    return found if any(s.tag_dir is not None for s in found) else []


def _openrlhf_steps(root: Path) -> list[_Step]:
    """Steps of an OpenRLHF ``--ckpt.path``: ``_actor`` tags (the last ``--ckpt.max_num``) and ``global_stepN_hf/`` models."""
    tags: dict[int, Path] = {}
    actor = root / "_actor"
    for child in sorted(actor.iterdir()) if actor.is_dir() else ():
        match = DS_TAG.match(child.name)
        if match and _is_tag(child) and (int(match[1]) not in tags or not child.name.startswith("best_")):
            tags[int(match[1])] = child
    models: dict[int, Path] = {}
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        match = HF_DIR_PATTERN.match(child.name)
        if match and child.is_dir():
            if (child / ADAPTER_CONFIG_NAME).exists():
                return []  # a LoRA run: the LoRA reader takes it
            if _has_weights(child):
                models[int(match[1])] = child
    steps = sorted(set(tags) | set(models))
    return [_Step(s, tags.get(s), tags.get(s) or models[s], models.get(s)) for s in steps]


def _param_shapes(tag_dir: Path) -> dict[str, tuple[int, ...]]:
    """Trainable parameter names and shapes, in flattening order (rank 0's model states)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if is_zero3_tag(tag_dir) else MODEL_STATES
    states = read_structure(tag_dir / name)
    if not isinstance(states, dict) or "param_shapes" not in states:
        raise AdapterFileError(f"{tag_dir / name}: no param_shapes; not a DeepSpeed model states file (re-save the checkpoint)")
    return {str(k): tuple(int(d) for d in v) for group in states["param_shapes"] for k, v in group.items()}


def _is_lora(tag_dir: Path) -> bool:
    try:
        return any("lora_" in name for name in _param_shapes(tag_dir))
    except AdapterFileError:
        return False


# ------------------------------------------------------------------------------ where bytes are


def _piece(folder: Path, path: Path, spans: dict[str, tuple[int, int]], ref: TensorRef, start: int) -> Piece:
    """The :class:`Piece` of a contiguous 1-D slice ``ref`` of a storage record, placed at element ``start``."""
    if ref.storage.key not in spans:
        raise AdapterFileError(f"{path}: storage record {ref.storage.key} is missing; restore the file or re-save the checkpoint")
    offset, size = spans[ref.storage.key]
    numel = 1
    for dim in ref.size:
        numel *= dim
    itemsize = ref.dtype.itemsize
    if (ref.offset + numel) * itemsize > size:
        raise AdapterFileError(f"{path}: storage record {ref.storage.key} is truncated; restore the file or re-save the checkpoint")
    return Piece(path.relative_to(folder).as_posix(), offset + ref.offset * itemsize, start, numel)


def _contiguous(ref: Any) -> bool:
    if not isinstance(ref, TensorRef):
        return False
    expected, stride = 1, []
    for dim in reversed(ref.size):
        stride.append(expected)
        expected *= dim
    return tuple(reversed(stride)) == ref.stride or expected <= 1


def _module_entries(folder: Path, path: Path, module: dict[str, Any], keys: set[str] | None = None) -> dict[str, TensorEntry]:
    """Entries of the module state dict's tensors (all, or ``keys``) stored in ``path``."""
    spans = storage_spans(path)
    entries = {}
    for key, ref in module.items():
        if keys is not None and key not in keys:
            continue
        if not _contiguous(ref):
            raise UnsupportedAdapterError(
                f"{path}: {key} is not a contiguous tensor in the module state dict; unsupported DeepSpeed layout"
            )
        piece = _piece(folder, path, spans, ref, 0)
        entries[str(key)] = TensorEntry(str(key), ref.dtype, tuple(ref.size), (piece,))
    return entries


@dataclass
class _TagLayout:
    """Where one DeepSpeed tag keeps each parameter: fp32 masters, bf16 module, dtypes, files."""

    masters: dict[str, TensorEntry]
    module: dict[str, TensorEntry]  # bf16 module weights (ZeRO-1/2); buffers and frozen parameters
    dtypes: dict[str, torch.dtype]  # the module's dtype of every tensor
    model_files: list[Path]
    optim_files: list[Path]
    storages: dict[Path, set[str]]  # file -> storage keys holding the masters or module tensors written


def _masters(folder: Path, optims: list[Path], pieces: dict[str, list[MasterPiece]], shapes: dict[str, tuple[int, ...]]):
    spans = {path: storage_spans(path) for path in optims}
    storages: dict[Path, set[str]] = {p: set() for p in optims}
    entries = {}
    for name, parts in pieces.items():
        placed = tuple(_piece(folder, optims[p.rank], spans[optims[p.rank]], p.ref, p.start) for p in parts)
        for p in parts:
            storages[optims[p.rank]].add(p.ref.storage.key)
        entry = TensorEntry(name, torch.float32, shapes[name], placed)
        entry.check_pieces(optims[0].parent)
        entries[name] = entry
    return entries, storages


def _check_parallel(path: Path, states: Any) -> None:
    if isinstance(states, dict) and int(states.get("mp_world_size", 1) or 1) != 1:
        raise UnsupportedAdapterError(
            f"{path}: saved with tensor parallel size {states['mp_world_size']}; full-parameter DeepSpeed states are read with tensor parallel 1"
        )


def _tag_layout(tag_dir: Path, folder: Path) -> _TagLayout:
    """Read one tag's pickles (no tensor data): the masters' pieces and the module's tensors."""
    if is_zero3_tag(tag_dir):
        models, optims, pieces, shapes = zero3_pieces(tag_dir)
        states = read_structure(models[0])
        _check_parallel(models[0], states)
        if states.get("frozen_param_shapes"):
            raise UnsupportedAdapterError(
                f"{models[0]}: ZeRO-3 frozen parameters (frozen_param_fragments) are not read yet; train all parameters"
            )
        module = dict(states.get("module") or {})
        params = {k: ref for k, ref in module.items() if k in shapes}
        if any(isinstance(ref, TensorRef) and any(ref.size) for ref in params.values()):
            raise UnsupportedAdapterError(f"{models[0]}: ZeRO-3 module states hold parameter values (not placeholders); unsupported layout")
        others = set(module) - set(shapes) - set(states.get("shared_params") or {})  # buffers (tied aliases are not stored)
        module_entries = _module_entries(folder, models[0], module, others) if others else {}
    else:
        models = [tag_dir / MODEL_STATES]
        states = read_structure(models[0])
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise AdapterFileError(f"{models[0]}: no 'module' state dict; not a DeepSpeed model states file")
        _check_parallel(models[0], states)
        if states.get("optimizer") is not None:
            raise UnsupportedAdapterError(
                f"{models[0]}: DeepSpeed without ZeRO keeps the optimizer inside the model states; full-parameter runs are read with ZeRO 1, 2 or 3"
            )
        module = dict(states["module"])
        optims, pieces, shapes = zero12_master_pieces(tag_dir, states)
        aliases = set(states.get("shared_params") or {})
        module_entries = _module_entries(folder, models[0], module, set(module) - aliases)
    masters, storages = _masters(folder, optims, pieces, shapes)
    dtypes = {k: ref.dtype for k, ref in module.items() if isinstance(ref, TensorRef)}
    storages[models[0]] = {module[k].storage.key for k in module_entries}
    return _TagLayout(masters, module_entries, dtypes, models, optims, storages)


def _has_masters(tag_dir: Path) -> bool:
    return any(OPTIM_STATES.match(p.name) for p in tag_dir.iterdir())


# ---------------------------------------------------------------------------------- checkpoints


def _master_checkpoint(step: _Step) -> tuple[DenseCheckpoint, dict[str, torch.dtype]]:
    """A step read from its fp32 masters (parameters) and module states (buffers, frozen weights)."""
    assert step.tag_dir is not None
    layout = _tag_layout(step.tag_dir, step.folder)
    entries = {**{k: e for k, e in layout.module.items() if k not in layout.masters}, **layout.masters}
    files = tuple(sorted({p.file for e in entries.values() for p in e.pieces}))
    output = {k: layout.dtypes.get(k, e.dtype) for k, e in entries.items()}
    return DenseCheckpoint(step=step.step, folder=step.folder, entries=entries, files=files), output


def _weights_checkpoint(step: _Step) -> DenseCheckpoint:
    """A step read from its bf16 weights: the HF model folder, else the ZeRO-1/2 module states."""
    if step.hf_dir is not None:
        return read_model_folder(step.hf_dir, step.step)
    if step.tag_dir is not None and not is_zero3_tag(step.tag_dir):
        path = step.tag_dir / MODEL_STATES
        states = read_structure(path)
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, dict):
            raise AdapterFileError(f"{path}: no 'module' state dict; not a DeepSpeed model states file")
        _check_parallel(path, states)
        aliases = set(states.get("shared_params") or {})
        entries = _module_entries(step.tag_dir, path, module, set(module) - aliases)
        return DenseCheckpoint(step=step.step, folder=step.tag_dir, entries=entries, files=(MODEL_STATES,))
    where = step.tag_dir or step.folder
    raise FormatDetectionError(
        f"{where}: step {step.step} has neither ZeRO optimizer states (fp32 masters) nor model weights "
        "(ZeRO-3 module states hold placeholders only); restore the rank files or save model.safetensors"
    )


def _precision_note(steps: list[_Step], layout: str) -> str:
    without = [s for s in steps if s.tag_dir is None or not _has_masters(s.tag_dir)]
    missing = ", ".join(str(s.step) for s in without[:8]) + (" ..." if len(without) > 8 else "")
    if layout == OPENRLHF and all(s.tag_dir is None for s in steps):
        where = f"{steps[0].folder.parent}/_actor/ (no DeepSpeed checkpoint saved: --ckpt.disable_ds?)"
        fix = "save OpenRLHF's DeepSpeed checkpoints (without --ckpt.disable_ds)"
    elif layout == OPENRLHF and all(s.tag_dir is None for s in without):
        where = f"{steps[0].folder.parent}/_actor/global_stepN/ (kept for the last --ckpt.max_num steps only; none for steps {missing})"
        fix = "raise --ckpt.max_num (or --ckpt.max_mem) to keep the DeepSpeed checkpoints of every saved step"
    else:
        first = without[0].tag_dir or without[0].folder
        where = f"*_optim_states.pt of the DeepSpeed tag folders (absent for steps {missing}, e.g. in {first})"
        fix = "keep DeepSpeed's optimizer states (engine.save_checkpoint) in every checkpoint"
    return f"the fp32 master weights were looked for in {where} and not found: {fix}, for a faithful trajectory"


def _model_files_dir(steps: list[_Step], base: Path | None, root: Path) -> Path:
    for step in reversed(steps):
        if step.hf_dir is not None and (step.hf_dir / "config.json").is_file():
            return step.hf_dir
        if (step.folder / "config.json").is_file():
            return step.folder
    if base is not None and (base / "config.json").is_file():
        return base
    raise FormatDetectionError(
        f"{root}: no config.json beside the DeepSpeed checkpoints (OpenRLHF writes it with --ckpt.save_hf); "
        "pass --base with the pretrained model folder"
    )


class DeepSpeedStates:
    """OpenRLHF ``_actor/global_stepN/`` and HF Trainer ``checkpoint-N/global_stepN/`` full-parameter states."""

    name = "deepspeed"
    layouts = (OPENRLHF, TRAINER)

    def _steps(self, root: Path) -> tuple[str, list[_Step]]:
        trainer = _trainer_steps(root)
        if trainer:
            return TRAINER, trainer
        return OPENRLHF, _openrlhf_steps(root)

    def probe(self, root: Path) -> bool:
        _layout, steps = self._steps(root)
        tags = [s.tag_dir for s in steps if s.tag_dir is not None]
        return bool(steps) and not (tags and _is_lora(tags[-1]))

    def load(self, root: Path, *, base: Path | None, source_label: str | None, min_steps: int) -> DenseTrajectory:
        layout, steps = self._steps(root)
        if not steps:
            raise FormatDetectionError(f"{root}: no DeepSpeed checkpoints (checkpoint-N/global_stepN/ or _actor/global_stepN/)")
        check_steps(root, [(s.step, s.folder) for s in steps], min_steps)
        note, output_dtypes = None, {}
        if all(s.tag_dir is not None and _has_masters(s.tag_dir) for s in steps):
            read = [_master_checkpoint(s) for s in steps]
            checkpoints = tuple(c for c, _dtypes in read)
            output_dtypes = read[-1][1]
        else:
            note = _precision_note(steps, layout)
            LOG.info("reading bf16 weights: %s", note)
            checkpoints = tuple(_weights_checkpoint(s) for s in steps)
        base_ckpt = read_base(base)
        check_trajectory(checkpoints, base_ckpt)
        return DenseTrajectory(
            source=root,
            source_label=source_label or str(root),
            layout=layout,
            checkpoints=checkpoints,
            base=base_ckpt,
            model_files_dir=_model_files_dir(steps, base, root),
            output_dtypes={k: d for k, d in output_dtypes.items() if d != checkpoints[-1].entries[k].dtype},
            precision_note=note,
        )

    def resumable(self, trajectory: DenseTrajectory) -> DenseResume:
        layout, steps = self._steps(trajectory.source)
        latest = next((s for s in steps if s.step == trajectory.latest.step), None)
        if latest is None or latest.tag_dir is None:
            raise OutputError(
                f"{trajectory.source}: no DeepSpeed checkpoint for step {trajectory.latest.step} "
                "(OpenRLHF keeps the last --ckpt.max_num under _actor/); --resumable needs the newest step's DeepSpeed tag folder"
            )
        return _resume_plan(trajectory, layout, latest)


# ------------------------------------------------------------------------------------- resume


def _resume_plan(trajectory: DenseTrajectory, layout: str, latest: _Step) -> DenseResume:
    tag_dir = latest.tag_dir
    assert tag_dir is not None
    if not _has_masters(tag_dir):
        raise OutputError(f"{tag_dir}: no ZeRO optimizer states (*_optim_states.pt); DeepSpeed cannot resume from this checkpoint")
    copy_from = latest.folder if layout == TRAINER else tag_dir
    tags = _tag_layout(tag_dir, copy_from)
    targets_entries = [tags.masters, tags.module]
    hf_files: list[Path] = []
    if layout == TRAINER and latest.hf_dir is not None:
        hf = read_model_folder(latest.hf_dir, latest.step)
        targets_entries.append(hf.entries)
        hf_files = [latest.hf_dir / f for f in hf.files] + ([latest.hf_dir / INDEX_NAME] if (latest.hf_dir / INDEX_NAME).is_file() else [])
    keys = set(trajectory.keys)
    for entries in targets_entries:
        extra = sorted(set(entries) - keys)
        if extra:
            raise OutputError(
                f"{copy_from}: {extra[0]} is stored in the checkpoint but not in the trajectory; --resumable would leave it unchanged"
            )
    stage = "ZeRO-3" if is_zero3_tag(tag_dir) else "ZeRO-1/2"
    check_resume_files(
        ResumeFiles(
            copy_from,
            f"{'HF Trainer' if layout == TRAINER else 'OpenRLHF'} DeepSpeed {stage} full-parameter",
            frozenset({*tags.model_files, *tags.optim_files, *hf_files, *_zero3_model_files(tag_dir)}),
            TRAINER_WEIGHTLESS,
            "DeepSpeed ZeRO-1/2/3 with tensor parallel 1 (module states, fp32 master partitions and model*.safetensors)",
        )
    )
    target = f"{RESUME_DIR}/{latest.folder.name}" if layout == TRAINER else f"{RESUME_DIR}/_actor/{tag_dir.name}"
    return DenseResume(
        copy_from=copy_from,
        copy_to=target,
        targets=[WriteTarget(target, entries) for entries in targets_entries if entries],
        info=_info(layout, target, latest.step, len(tags.optim_files), stage),
        finalize=_Finalize(layout, tag_dir, tuple(sorted(p.relative_to(copy_from).as_posix() for p, k in tags.storages.items() if k))),
    )


def _zero3_model_files(tag_dir: Path) -> list[Path]:
    """Every rank's ZeRO-3 module states (parameter placeholders, checked empty; buffers copied as they are)."""
    if not is_zero3_tag(tag_dir):
        return []
    return [p for p in tag_dir.iterdir() if re.match(r"^zero_pp_rank_\d+_mp_rank_00_model_states\.pt$", p.name)]


@dataclass(frozen=True)
class _Finalize:
    """After the write pass, on the written copy: zip checksums of the rewritten files; OpenRLHF's
    ``latest``, recovery scripts and critic beside it."""

    layout: str
    tag_dir: Path
    rewritten: tuple[str, ...]  # torch zip files (relative to the copy) whose bytes were written in place

    def __call__(self, copy: Path) -> None:
        for name in self.rewritten:
            refresh_crcs(copy / name)
        if self.layout != OPENRLHF:
            return
        actor = self.tag_dir.parent
        (copy.parent / "latest").write_text(self.tag_dir.name, encoding="utf-8")
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            if (actor / script).is_file():
                shutil.copyfile(actor / script, copy.parent / script)
        critic = actor.parent / "_critic" / self.tag_dir.name
        if critic.is_dir():
            shutil.copytree(critic, copy.parent.parent / "_critic" / self.tag_dir.name)
            (copy.parent.parent / "_critic" / "latest").write_text(self.tag_dir.name, encoding="utf-8")


def _info(layout: str, target: str, step: int, world: int, stage: str) -> dict[str, Any]:
    notes = [
        f"the resumed run continues at step {step}: Adam moments, lr scheduler and client state are the last real checkpoint's; "
        f"the weights were replaced in every rank's fp32 master partition ({stage}) and in the bf16 module",
        f"resume with the same data-parallel size ({world} ranks) and ZeRO stage",
    ]
    if layout == OPENRLHF:
        command = "python -m openrlhf.cli.train_ppo_ray <your training arguments> --ckpt.path <out>/resume --ckpt.load_enable"
        notes.append("a critic checkpoint (_critic/) of the same step is copied unchanged")
    else:
        command = f"trainer.train(resume_from_checkpoint='<out>/{target}')"
    return {"checkpoint_dir": target, "command": command, "notes": notes}


READER = DeepSpeedStates()
