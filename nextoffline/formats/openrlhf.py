"""OpenRLHF run folders (``--ckpt.path``): DeepSpeed checkpoints plus PEFT adapters per step.

``save_checkpoint`` of OpenRLHF's policy actor writes, per ``--ckpt.save_steps``, a DeepSpeed
checkpoint ``_actor/global_stepN/`` (``mp_rank_00_model_states.pt`` with the bf16 module state
dict, ``bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank with the fp32
master weights and Adam moments) and ``_actor/latest``; with ``--ckpt.save_hf`` it also writes
the PEFT adapter ``global_stepN_hf/``. DeepSpeed keeps only the last ``--ckpt.max_num`` ``_actor``
checkpoints; the ``_hf`` folders stay.

nextoffline reads the adapter of every step from ``global_stepN_hf/``. On resume
(``--ckpt.load_enable``) DeepSpeed loads the LoRA weights twice: the bf16 copy from the model
states, then the fp32 master partitions from the ZeRO optimizer states, which the first optimizer
step writes back. :meth:`OpenRLHFFormat.write_resumable` therefore replaces the LoRA values in
both places (in place: nothing else in the files changes). See ``docs/formats.md``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAMES
from nextoffline.errors import AdapterFileError, FormatDetectionError, UnsupportedAdapterError
from nextoffline.formats.base import find_adapter_weights, register_format
from nextoffline.formats.deepspeed_zero3 import (
    MasterPiece,
    assemble_master_lora,
    is_zero3_tag,
    load_zero3_master_lora_state,
    write_zero3_checkpoint,
    zero3_files,
)
from nextoffline.formats.lora_keys import checked_new_weights, peft_key, rewrite_safetensors
from nextoffline.formats.resume_files import ResumeFiles
from nextoffline.io.reader import register_state_loader
from nextoffline.io.torch_zip import Opaque, TensorRef, patch_tensors, read_structure, read_tensors, state_of
from nextoffline.types import ResumeInfo, StepRef

__all__ = ["OpenRLHFFormat", "is_deepspeed_model_states", "load_lora_state", "load_master_lora_state", "write_deepspeed_checkpoint"]

LOG = logging.getLogger(__name__)

ACTOR_DIR = "_actor"
CRITIC_DIR = "_critic"
LATEST_NAME = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
RECOVERY_SCRIPT = "zero_to_fp32.py"
HF_DIR_PATTERN = re.compile(r"^global_step(\d+)_hf$")
DS_TAG = re.compile(r"^(?:best_)?global_step(\d+)$")
_MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ANY_MODEL_STATES = re.compile(r"^(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def is_deepspeed_model_states(path: Path) -> bool:
    """True for DeepSpeed's ``mp_rank_XX_model_states.pt`` (ZeRO-1/2 module state dict)."""
    return _MODEL_STATES.match(path.name) is not None


def _model_states(path: Path) -> dict[str, Any]:
    state = read_structure(path)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise AdapterFileError(f"{path}: no 'module' state dict; not a DeepSpeed model states file")
    return state


def _lora_refs(path: Path, module: Mapping[str, Any]) -> dict[str, tuple[str, TensorRef]]:
    """``{peft name: (state key, tensor)}`` of the LoRA parameters of a module state dict."""
    refs = {}
    for key, value in module.items():
        name = peft_key(str(key))
        if name is None:
            continue
        if not isinstance(value, TensorRef):
            raise AdapterFileError(f"{path}: {key} is not a plain tensor; unsupported DeepSpeed layout")
        refs[name] = (str(key), value)
    if not refs:
        raise AdapterFileError(f"{path}: no LoRA parameters in the module state dict; was the run trained with --ds.lora.rank > 0?")
    return refs


def load_lora_state(weights_file: Path) -> dict[str, torch.Tensor]:
    """The bf16 LoRA tensors (PEFT names) of a DeepSpeed ``mp_rank_00_model_states.pt``."""
    refs = _lora_refs(weights_file, _model_states(weights_file)["module"])
    values = read_tensors(weights_file, [ref for _key, ref in refs.values()])
    return dict(sorted(zip(refs, values)))


register_state_loader(is_deepspeed_model_states, load_lora_state)


# --------------------------------------------------------------------------- ZeRO fp32 masters


def optim_files(tag_dir: Path, world: int) -> list[Path]:
    found: dict[int, Path] = {}
    for path in tag_dir.iterdir():
        match = OPTIM_STATES.match(path.name)
        if match and match[3] == "00":
            found[int(match[2])] = path
    missing = sorted(set(range(world)) - set(found))
    if missing:
        raise AdapterFileError(
            f"{tag_dir}: ZeRO optimizer states of ranks {missing} are missing (dp world size {world}); copy every rank's file"
        )
    return [found[r] for r in range(world)]


def _check_zero_stage(path: Path, optim: Mapping[str, Any]) -> None:
    if "fp32_flat_groups" in optim or zero_stage_of(optim) == 3:
        raise UnsupportedAdapterError(f"{path}: ZeRO-3 checkpoints are not supported by --resumable; train with --ds.zero_stage 1 or 2")
    if "single_partition_of_fp32_groups" not in optim:
        raise UnsupportedAdapterError(f"{path}: no fp32 master partitions (ZeRO disabled?); --resumable needs ZeRO stage 1 or 2")


def _master_pieces(tag_dir: Path, states: Mapping[str, Any]) -> tuple[list[Path], dict[str, list[MasterPiece]], dict[str, tuple[int, ...]]]:
    """ZeRO-1/2 fp32 master pieces for the LoRA path (ZeRO-3 refused by name for --resumable)."""
    return zero12_master_pieces(tag_dir, states, check=_check_zero_stage)


def _require_fp32_partitions(path: Path, optim: Mapping[str, Any]) -> None:
    if "single_partition_of_fp32_groups" not in optim:
        raise UnsupportedAdapterError(f"{path}: no single_partition_of_fp32_groups (fp32 masters); unsupported DeepSpeed optimizer")


def zero_stage_of(optim: Mapping[str, Any]) -> int | None:
    """The ``zero_stage`` a ZeRO optimizer state records (``None`` for bf16 ZeRO-1's ``BF16_Optimizer``)."""
    stage = optim.get("zero_stage")
    value = stage.args[0] if isinstance(stage, Opaque) and stage.args else stage
    return int(value) if isinstance(value, int) else None


def zero12_master_pieces(
    tag_dir: Path, states: Mapping[str, Any], *, check: Callable[[Path, Mapping[str, Any]], None] = _require_fp32_partitions
) -> tuple[list[Path], dict[str, list[MasterPiece]], dict[str, tuple[int, ...]]]:
    """Where each parameter's fp32 master values live in the ZeRO-1/2 partitions (header-only).

    DeepSpeed flattens each param group in ``param_shapes`` order, with the saved per-parameter
    alignment paddings, and splits it over the data-parallel ranks in order; the partitions are
    saved without the group's end padding, except by bf16 ZeRO-1 (``BF16_Optimizer``), which keeps
    it (``zero_to_fp32.py``'s rule). ``check`` vets each rank's optimizer state first.
    """
    files = optim_files(tag_dir, int(states["dp_world_size"]))
    optims = [read_structure(f)["optimizer_state_dict"] for f in files]
    for path, optim in zip(files, optims):
        check(path, optim)
    paddings = optims[0].get("param_alignment_paddings")
    pieces: dict[str, list[MasterPiece]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for group, param_shapes in enumerate(states["param_shapes"]):
        partitions: list[TensorRef] = [o["single_partition_of_fp32_groups"][group] for o in optims]
        bounds, total = [], 0
        for part in partitions:
            bounds.append((total, total + part.size[0]))
            total += part.size[0]
        offset = 0
        for index, (name, shape) in enumerate(param_shapes.items()):
            numel = int(torch.Size(shape).numel())
            shapes[name], pieces[name] = tuple(int(s) for s in shape), []
            for rank, (part, (lo, hi)) in enumerate(zip(partitions, bounds)):
                first, last = max(offset, lo), min(offset + numel, hi)
                if first < last:
                    ref = TensorRef(part.storage, part.offset + first - lo, (last - first,), (1,))
                    pieces[name].append(MasterPiece(rank, ref, first - offset, first - lo))
            offset += numel + (int(paddings[group][index]) if paddings else 0)
        tail = int((optims[-1].get("group_paddings") or [0] * (group + 1))[group]) if zero_stage_of(optims[0]) is None else 0
        if total - offset not in (0, tail):
            raise AdapterFileError(
                f"{tag_dir}: param group {group} holds {total} fp32 values, its parameters {offset}; the files do not match"
            )
    check_slice_mappings(tag_dir, optims, pieces)
    return files, pieces, shapes


def check_slice_mappings(tag_dir: Path, optims: list[Mapping[str, Any]], pieces: Mapping[str, list[MasterPiece]]) -> None:
    """Cross-check against DeepSpeed's own per-rank ``param_slice_mappings`` when saved."""
    for rank, optim in enumerate(optims):
        for group in optim.get("param_slice_mappings") or ():
            for name, address in group.items():
                fields = state_of(address)
                mine = [p for p in pieces.get(name, ()) if p.rank == rank]
                ok = len(mine) == 1 and (mine[0].ref.size[0], mine[0].local) == (fields.get("numel"), fields.get("start"))
                if not ok:
                    raise AdapterFileError(
                        f"{tag_dir}: fp32 partition of {name} on rank {rank} disagrees with DeepSpeed's slice map; unsupported layout"
                    )


def load_master_lora_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master LoRA tensors (PEFT names) of a DeepSpeed ZeRO-1/2/3 checkpoint folder."""
    if is_zero3_tag(tag_dir):
        return load_zero3_master_lora_state(tag_dir)
    states = _model_states(tag_dir / MODEL_STATES)
    files, pieces, shapes = _master_pieces(tag_dir, states)
    return assemble_master_lora(files, pieces, shapes)


# --------------------------------------------------------------------------- the format


def _hf_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        match = HF_DIR_PATTERN.match(child.name)
        if match and (child / ADAPTER_CONFIG_NAME).is_file():
            found.append((int(match[1]), child))
    return sorted(found)


def _ds_tags(actor: Path) -> dict[int, Path]:
    tags: dict[int, Path] = {}
    for child in sorted(actor.iterdir()) if actor.is_dir() else ():
        match = DS_TAG.match(child.name)
        if match and _is_tag(child):
            step = int(match[1])
            if step not in tags or not child.name.startswith("best_"):
                tags[step] = child
    return tags


def _is_tag(folder: Path) -> bool:
    """A DeepSpeed tag folder of any ZeRO stage or parallel layout (model states of some rank)."""
    return folder.is_dir() and any(ANY_MODEL_STATES.match(p.name) for p in folder.iterdir())


class OpenRLHFFormat:
    """OpenRLHF ``--ckpt.path`` folders: ``_actor/global_stepN/`` (DeepSpeed) and ``global_stepN_hf/`` (PEFT)."""

    name: ClassVar[str] = "openrlhf"
    description: ClassVar[str] = "global_stepN_hf/ PEFT folders and _actor/global_stepN/ DeepSpeed checkpoints (OpenRLHF)"

    def probe(self, root: Path) -> bool:
        return bool(_hf_dirs(root)) or bool(_ds_tags(root / ACTOR_DIR))

    def list_steps(self, root: Path) -> list[StepRef]:
        hf = _hf_dirs(root)
        if not hf:
            if _ds_tags(root / ACTOR_DIR):
                raise FormatDetectionError(
                    f"{root}: only DeepSpeed checkpoints (_actor/), no global_stepN_hf/ adapters, so lora_alpha is unknown; "
                    "train with --ckpt.save_hf (--save_hf_ckpt up to v0.10.1) or pass --adapter STEP=PATH"
                )
            raise FormatDetectionError(f"{root}: no global_stepN_hf/ folders; point at OpenRLHF's --ckpt.path")
        tags = _ds_tags(root / ACTOR_DIR)
        refs = []
        for step, folder in hf:
            weights = find_adapter_weights(folder) or folder / ADAPTER_WEIGHTS_NAME
            refs.append(StepRef(step=step, adapter_dir=folder, weights_file=weights, checkpoint_dir=tags.get(step, folder)))
        return refs

    def adapter_config(self, ref: StepRef) -> dict[str, Any]:
        """The PEFT config OpenRLHF saved next to the adapter."""
        return json.loads((ref.adapter_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))

    def resume_files(self, latest: StepRef) -> list[ResumeFiles]:
        """The actor's DeepSpeed tag folder: ``engine.load_checkpoint`` reads every weight file in it."""
        tag_dir = latest.checkpoint_dir
        if not DS_TAG.match(tag_dir.name):  # no DeepSpeed checkpoint at all: write_resumable says so
            return []
        rewritten = deepspeed_rewritten_files(tag_dir)
        stage = "ZeRO-3" if is_zero3_tag(tag_dir) else "ZeRO-1/2"
        return [ResumeFiles(tag_dir, f"OpenRLHF DeepSpeed {stage}", rewritten, (), "DeepSpeed ZeRO-1/2/3 with tensor parallel 1")]

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        tag_dir = latest.checkpoint_dir
        if not _is_tag(tag_dir):
            raise AdapterFileError(
                f"{tag_dir}: no DeepSpeed checkpoint for step {latest.step} (OpenRLHF keeps the last --ckpt.max_num under _actor/, "
                "none with --ckpt.disable_ds); --resumable needs _actor/global_stepN of the newest adapter step"
            )
        actor, root = tag_dir.parent, tag_dir.parent.parent
        target = out_dir / ACTOR_DIR / tag_dir.name
        new, world = write_deepspeed_checkpoint(tag_dir, target, adapter_dir)
        _copy_tracker(actor, out_dir / ACTOR_DIR, tag_dir.name)
        notes = list(_notes(latest.step, world))
        hf = latest.adapter_dir
        if HF_DIR_PATTERN.match(hf.name):
            shutil.copytree(hf, out_dir / hf.name, ignore=shutil.ignore_patterns(*ADAPTER_WEIGHTS_NAMES))
            weights = find_adapter_weights(hf)
            if weights is not None and weights.suffix == ".safetensors":
                rewrite_safetensors(weights, out_dir / hf.name / weights.name, new)
        critic = root / CRITIC_DIR / tag_dir.name
        if critic.is_dir():
            shutil.copytree(critic, out_dir / CRITIC_DIR / tag_dir.name)
            _copy_tracker(critic.parent, out_dir / CRITIC_DIR, tag_dir.name)
            notes.append("the critic checkpoint (_critic/) was copied unchanged")
        LOG.info("wrote OpenRLHF checkpoint %s (%d ZeRO partitions)", target, world)
        return ResumeInfo(checkpoint_dir=target, command=_resume_command(out_dir), notes=tuple(notes))


def deepspeed_rewritten_files(tag_dir: Path) -> frozenset[Path]:
    """The files of a DeepSpeed tag folder that :func:`write_deepspeed_checkpoint` rewrites.

    ZeRO-1/2: ``mp_rank_00_model_states.pt`` and the tensor-parallel rank 0 optimizer states of
    every data parallel rank. ZeRO-3: every rank's model states (empty LoRA placeholders, checked)
    and optimizer states (fp32 partitions). Nothing else, e.g. ``mp_rank_01_*`` of tensor parallelism,
    which the caller's check then refuses.
    """
    if is_zero3_tag(tag_dir):
        models, optims = zero3_files(tag_dir)
        return frozenset({*models, *optims})  # fp32 partitions rewritten; module states hold empty placeholders (checked)
    if not (tag_dir / MODEL_STATES).is_file():
        return frozenset()
    optim = {p for p in tag_dir.iterdir() if (m := OPTIM_STATES.match(p.name)) and m[3] == "00"}
    return frozenset({tag_dir / MODEL_STATES, *optim})


def write_deepspeed_checkpoint(tag_dir: Path, target: Path, adapter_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Copy a DeepSpeed ZeRO-1/2/3 checkpoint folder with the LoRA values of a PEFT adapter put in.

    ZeRO-3 folders go to :func:`~nextoffline.formats.deepspeed_zero3.write_zero3_checkpoint`.

    ``tag_dir`` is one ``engine.save_checkpoint`` tag folder (``mp_rank_00_model_states.pt`` and
    ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``); ``target`` must not exist. The LoRA
    tensors are replaced in the module state dict and in every rank's fp32 master partition; every
    other byte is copied. Usable for any DeepSpeed engine wrapping a ``PeftModel`` (OpenRLHF,
    ``transformers.Trainer`` with DeepSpeed).

    Returns:
        The adapter's LoRA tensors (PEFT names) and the data-parallel world size of the checkpoint.
    """
    if is_zero3_tag(tag_dir):
        return write_zero3_checkpoint(tag_dir, target, adapter_dir)
    states = _model_states(tag_dir / MODEL_STATES)
    lora = _lora_refs(tag_dir / MODEL_STATES, states["module"])
    new = checked_new_weights(adapter_dir, {k: ref.size for k, (_s, ref) in lora.items()}, tag_dir / MODEL_STATES)
    files, pieces, _shapes = _master_pieces(tag_dir, states)
    rewritten = {MODEL_STATES} | {f.name for f in files}
    shutil.copytree(tag_dir, target, ignore=lambda d, names: [n for n in names if n in rewritten and Path(d) == tag_dir])
    _write_module(tag_dir / MODEL_STATES, target / MODEL_STATES, lora, new)
    _write_masters(files, target, pieces, lora, new)
    return new, int(states["dp_world_size"])


def _write_module(source: Path, dest: Path, lora: Mapping[str, tuple[str, TensorRef]], new: Mapping[str, torch.Tensor]) -> None:
    """Replace the bf16 LoRA tensors of the module state dict (a plain copy when nothing changes)."""
    names = list(lora)
    current = read_tensors(source, [lora[n][1] for n in names])
    updates = [(lora[n][1], new[n].to(old.dtype)) for n, old in zip(names, current)]
    if all(torch.equal(value, old) for (_ref, value), old in zip(updates, current)):
        shutil.copyfile(source, dest)
    else:
        patch_tensors(source, dest, updates)


def _write_masters(
    files: list[Path],
    target: Path,
    pieces: Mapping[str, list[MasterPiece]],
    lora: Mapping[str, tuple[str, TensorRef]],
    new: Mapping[str, torch.Tensor],
) -> None:
    """Replace the LoRA slices of every rank's fp32 master partition; Adam moments stay as they are.

    An element whose new value is what its fp32 master rounds to in the adapter's dtype keeps the
    master value, so unchanged weights keep their full precision (and a round trip is exact).
    """
    per_rank: dict[int, list[tuple[TensorRef, torch.Tensor]]] = {r: [] for r in range(len(files))}
    for name, (state_key, _ref) in lora.items():
        if state_key not in pieces:
            raise AdapterFileError(f"{files[0]}: {state_key} is not in the optimizer's param_shapes; is it trainable?")
        flat = new[name].detach().reshape(-1)
        for piece in pieces[state_key]:
            per_rank[piece.rank].append((piece.ref, flat[piece.start : piece.start + piece.ref.size[0]]))
    for rank, path in enumerate(files):
        refs = [ref for ref, _value in per_rank[rank]]
        current = read_tensors(path, refs)
        values = [torch.where(old.to(new.dtype) == new, old, new.to(old.dtype)) for (_ref, new), old in zip(per_rank[rank], current)]
        dest = target / path.name
        if all(torch.equal(value, old) for value, old in zip(values, current)):
            shutil.copyfile(path, dest)
        else:
            patch_tensors(path, dest, list(zip(refs, values)))


def _copy_tracker(source_dir: Path, dest_dir: Path, tag: str) -> None:
    """Copy DeepSpeed's recovery script and point ``latest`` at ``tag``."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if (source_dir / RECOVERY_SCRIPT).is_file():
        shutil.copyfile(source_dir / RECOVERY_SCRIPT, dest_dir / RECOVERY_SCRIPT)
    latest = source_dir / LATEST_NAME
    if latest.is_file() and latest.read_text(encoding="utf-8").strip() == tag:
        shutil.copyfile(latest, dest_dir / LATEST_NAME)
    else:
        (dest_dir / LATEST_NAME).write_text(tag, encoding="utf-8")


def _resume_command(ckpt_path: Path) -> str:
    return f"python -m openrlhf.cli.train_ppo_ray <your training arguments> --ckpt.path {ckpt_path} --ckpt.load_enable"


def _notes(step: int, world: int) -> tuple[str, ...]:
    return (
        f"the resumed run continues at step {step}: Adam moments, lr scheduler, global step and dataloader state are those of the "
        "last real checkpoint; only the LoRA values were replaced, in the bf16 module and in every rank's fp32 master partition",
        f"resume with the same data-parallel size ({world} ranks) and ZeRO stage; DeepSpeed refuses another size",
        "OpenRLHF up to v0.10.1 spells the flags --ckpt_path DIR --load_checkpoint",
    )


register_format(OpenRLHFFormat())
