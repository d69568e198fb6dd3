"""DeepSpeed ZeRO-3 checkpoint folders: where the LoRA weights live, and rewriting them in place.

Read from DeepSpeed 0.19.8 (``deepspeed/runtime/engine.py``: ``_get_ckpt_name``,
``_save_checkpoint``, ``_load_checkpoint``, ``load_module_state_dict``;
``deepspeed/runtime/zero/stage3.py``: ``_rigid_state_dict``, ``_rigid_load_state_dict``;
``deepspeed/utils/zero_to_fp32.py``: ``zero3_partitioned_param_info``,
``_zero3_merge_trainable_params``). One ``engine.save_checkpoint`` tag folder holds, per data
parallel rank R:

* ``zero_pp_rank_R_mp_rank_00_model_states.pt``: ``module`` with an EMPTY placeholder tensor per
  ZeRO-3 parameter (no values), ``param_shapes`` (trainable parameters, a dict per sub group, in
  flattening order), ``frozen_param_fragments`` (this rank's part of the frozen base weights);
* ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``: ``optimizer_state_dict`` with
  ``fp32_flat_groups`` (this rank's fp32 master partition per sub group) and the Adam moments.

Each trainable parameter of ``numel`` values is split into ``ceil(numel / W)`` values per rank
(rank R holds ``[R*p, (R+1)*p)`` of the flattened parameter, the last rank zero-padded); a rank's
partitions of all parameters are concatenated in ``param_shapes`` order across its sub groups.
On resume ``_rigid_load_state_dict`` copies ``fp32_flat_groups`` into the masters and then the
bf16 partitions from them, so the fp32 partitions are the ONLY place the LoRA values are loaded
from: :func:`write_zero3_checkpoint` rewrites them in every rank's file and copies the rest.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextoffline.errors import AdapterFileError, UnsupportedAdapterError
from nextoffline.formats.lora_keys import checked_new_weights, peft_key
from nextoffline.io.torch_zip import SubclassRef, TensorRef, read_structure, read_tensors

__all__ = [
    "MasterPiece",
    "assemble_master_lora",
    "is_zero3_tag",
    "load_zero3_master_lora_state",
    "write_zero3_checkpoint",
    "zero3_files",
]

_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def is_zero3_tag(tag_dir: Path) -> bool:
    """True when ``tag_dir`` holds ZeRO-3 per-rank model states (``zero_pp_rank_0_mp_rank_00_model_states.pt``)."""
    return (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()


def _by_rank(tag_dir: Path, pattern: re.Pattern[str], rank_group: int, what: str) -> list[Path]:
    found: dict[int, Path] = {}
    for path in tag_dir.iterdir():
        match = pattern.match(path.name)
        if match and match[rank_group + 1] == "00":
            found[int(match[rank_group])] = path
    world = max(found) + 1 if found else 0
    missing = sorted(set(range(world)) - set(found))
    if not found or missing:
        raise AdapterFileError(f"{tag_dir}: ZeRO-3 {what} of ranks {missing or [0]} are missing; copy every rank's file")
    return [found[r] for r in range(world)]


def zero3_files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(model states, optimizer states)`` of every data-parallel rank, ordered by rank."""
    models = _by_rank(tag_dir, _MODEL, 1, "model states")
    optims = _by_rank(tag_dir, _OPTIM, 2, "optimizer states")
    if len(models) != len(optims):
        raise AdapterFileError(f"{tag_dir}: {len(models)} ZeRO-3 model states but {len(optims)} optimizer states; copy every rank's file")
    return models, optims


def _flat_ref(value: Any, path: Path) -> TensorRef:
    ref = value.shell if isinstance(value, SubclassRef) else value
    if not isinstance(ref, TensorRef) or len(ref.size) != 1 or ref.dtype != torch.float32:
        raise AdapterFileError(f"{path}: fp32_flat_groups does not hold flat fp32 tensors; unsupported DeepSpeed version")
    return ref


@dataclass(frozen=True)
class MasterPiece:
    """Part of one parameter's flattened values that one rank's fp32 partition holds (ZeRO-1/2/3)."""

    rank: int
    ref: TensorRef  # slice of the rank's partition
    start: int  # offset in the flattened parameter
    local: int  # offset in the rank's partition


def assemble_master_lora(
    files: Sequence[Path], pieces: Mapping[str, list[MasterPiece]], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The fp32 master LoRA tensors (PEFT names), each assembled from its pieces in every rank's file."""
    result = {}
    for key, parts in pieces.items():
        name = peft_key(key)
        if name is None:
            continue
        flat = torch.empty(int(torch.Size(shapes[key]).numel()), dtype=torch.float32)
        for piece in parts:
            (value,) = read_tensors(files[piece.rank], [piece.ref])
            flat[piece.start : piece.start + value.numel()] = value
        result[name] = flat.view(shapes[key])
    return dict(sorted(result.items()))


def zero3_pieces(tag_dir: Path) -> tuple[list[Path], list[Path], dict[str, list[Any]], dict[str, tuple[int, ...]]]:
    """Where each trainable parameter's fp32 values live in every rank's ``fp32_flat_groups``."""
    models, optims = zero3_files(tag_dir)
    world = len(models)
    states = read_structure(models[0])
    if int(states.get("dp_world_size", world)) != world:
        raise AdapterFileError(f"{tag_dir}: dp_world_size {states.get('dp_world_size')} but {world} ranks' files; copy every rank's file")
    shapes = {str(k): tuple(int(s) for s in v) for group in states["param_shapes"] for k, v in group.items()}
    flats: list[list[TensorRef]] = []
    for path in optims:
        optim = read_structure(path)["optimizer_state_dict"]
        if "fp32_flat_groups" not in optim:
            raise UnsupportedAdapterError(f"{path}: no fp32_flat_groups; not a ZeRO-3 optimizer state (mixed ZeRO stages?)")
        flats.append([_flat_ref(v, path) for v in optim["fp32_flat_groups"]])
    sizes = [ref.size[0] for ref in flats[0]]
    bounds = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
    pieces: dict[str, list[MasterPiece]] = {}
    offset = 0
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        per_rank = -(-numel // world)
        group = next((g for g in range(len(sizes)) if bounds[g] <= offset < bounds[g + 1]), None)
        if per_rank and (group is None or offset + per_rank > bounds[group + 1]):
            raise AdapterFileError(f"{tag_dir}: fp32 partition of {name} crosses its sub group; the files do not match param_shapes")
        pieces[name] = []
        for rank in range(world):
            start, length = rank * per_rank, max(0, min(per_rank, numel - rank * per_rank))
            if length and group is not None:
                base = flats[rank][group]
                ref = TensorRef(base.storage, base.offset + offset - bounds[group], (length,), (1,))
                pieces[name].append(MasterPiece(rank, ref, start, offset - bounds[group]))
        offset += per_rank
    if offset != bounds[-1]:
        raise AdapterFileError(
            f"{tag_dir}: fp32 partitions hold {bounds[-1]} values per rank, the parameters {offset}; the files do not match"
        )
    return models, optims, pieces, shapes


def load_zero3_master_lora_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master LoRA tensors (PEFT names) of a ZeRO-3 checkpoint folder, assembled from every rank."""
    _models, optims, pieces, shapes = zero3_pieces(tag_dir)
    return assemble_master_lora(optims, pieces, shapes)


def _check_placeholders(models: list[Path], lora_keys: Mapping[str, str]) -> None:
    """The module states must hold no LoRA values (ZeRO-3 placeholders), else they would be loaded unchanged."""
    for path in models:
        module = read_structure(path).get("module") or {}
        for key in lora_keys.values():
            value = module.get(key)
            if isinstance(value, TensorRef) and any(value.size):
                raise UnsupportedAdapterError(
                    f"{path}: {key} holds values in the ZeRO-3 module states (not an empty placeholder); unsupported DeepSpeed layout"
                )


def write_zero3_checkpoint(tag_dir: Path, target: Path, adapter_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Copy a ZeRO-3 tag folder with the adapter's LoRA values in every rank's fp32 master partition.

    Adam moments, module placeholders, frozen fragments and every other byte are copied unchanged.

    Returns:
        The adapter's LoRA tensors (PEFT names) and the data-parallel world size.
    """
    from nextoffline.formats.openrlhf import _write_masters

    models, optims, pieces, shapes = zero3_pieces(tag_dir)
    lora = {name: key for key in pieces if (name := peft_key(key)) is not None}
    if not lora:
        raise AdapterFileError(f"{models[0]}: no LoRA parameters among the trainable ZeRO-3 parameters; was the run trained with LoRA?")
    new = checked_new_weights(adapter_dir, {name: shapes[key] for name, key in lora.items()}, models[0])
    _check_placeholders(models, lora)
    rewritten = {p.name for p in optims}
    shutil.copytree(tag_dir, target, ignore=lambda d, names: [n for n in names if n in rewritten and Path(d) == tag_dir])
    refs = {name: (key, None) for name, key in lora.items()}
    _write_masters(optims, target, pieces, refs, new)  # type: ignore[arg-type]  (only the state key is used)
    return new, len(models)
