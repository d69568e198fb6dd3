"""accelerate FSDP model files in ``transformers.Trainer`` checkpoints: read and rewrite their LoRA tensors.

Read from accelerate 1.15.0 (``accelerate/utils/fsdp_utils.py``: ``save_fsdp_model``,
``load_fsdp_model``, ``_get_model_state_dict``, ``_set_model_state_dict``) and transformers 5.24.0
(``Trainer._save_optimizer_and_scheduler``, ``_load_from_checkpoint``, ``get_fsdp_ckpt_kwargs`` ->
``adapter_only=True`` for PEFT models). With FSDP, ``Trainer`` resumes the weights through
``load_fsdp_model(..., adapter_only=True)`` from one of:

* ``pytorch_model_fsdp.bin`` (``FULL_STATE_DICT``): ``torch.save`` of the full LoRA tensors (PEFT names
  with FSDP1, module names with the adapter name with FSDP2);
* ``pytorch_model_fsdp_0/`` (``SHARDED_STATE_DICT``): a ``torch.distributed.checkpoint`` folder
  (``.metadata`` + ``__R_0.distcp``) of ``{"model": get_peft_model_state_dict(model)}`` shards. With
  this layout ``Trainer.save_model`` writes no adapter file at all.

:func:`rewrite_full` patches the LoRA bytes of the ``.bin`` in place (like the DeepSpeed writer);
:func:`rewrite_sharded` loads the DCP folder in one process, replaces the LoRA tensors and saves a
new DCP folder with ``torch.distributed.checkpoint.save`` (``no_dist``): unsharded chunks, which
DCP re-shards to any world size on load.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nextoffline.errors import AdapterFileError
from nextoffline.formats.lora_keys import checked_new_weights, is_peft_lora_key, peft_key
from nextoffline.io.torch_zip import TensorRef, patch_tensors, read_structure, read_tensors

__all__ = ["FSDP_FULL", "FSDP_SHARDED", "fsdp_model_files", "load_sharded_lora_state", "rewrite_full", "rewrite_sharded"]

LOG = logging.getLogger(__name__)

#: Trainer saves and loads model index 0 only (``save_fsdp_model(..., model_index=0)``).
FSDP_FULL = re.compile(r"^pytorch_model_fsdp\.bin$")
FSDP_SHARDED = re.compile(r"^pytorch_model_fsdp_0$")
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
_MODEL_PREFIX = "model."  # save_fsdp_model nests the state dict under "model"


def fsdp_model_files(checkpoint_dir: Path) -> list[Path]:
    """The accelerate FSDP model files of one checkpoint (``.bin`` files and DCP folders)."""
    found = []
    for path in sorted(checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else ():
        if (path.is_file() and FSDP_FULL.match(path.name)) or (path.is_dir() and FSDP_SHARDED.match(path.name)):
            found.append(path)
    return found


def lora_name(key: str) -> str | None:
    """PEFT's name of a LoRA tensor saved under FSDP (wrapper prefixes and the adapter name removed)."""
    key = _WRAPPERS.sub("", key)
    if is_peft_lora_key(key):
        return key
    return peft_key(key)


def rewrite_full(source: Path, dest: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Copy a ``FULL_STATE_DICT`` ``pytorch_model_fsdp.bin`` with the adapter's LoRA values in place."""
    state = read_structure(source)
    if not isinstance(state, Mapping):
        raise AdapterFileError(f"{source}: not a state dict; re-save the checkpoint with the trainer")
    refs: dict[str, TensorRef] = {}
    for key, value in state.items():
        name = lora_name(str(key))
        if name is not None:
            if not isinstance(value, TensorRef):
                raise AdapterFileError(f"{source}: {key} is not a plain tensor; unsupported FSDP layout")
            refs[name] = value
    if not refs:
        raise AdapterFileError(f"{source}: no LoRA tensors in the FSDP state dict; was the run trained with a PEFT LoRA model?")
    new = checked_new_weights(adapter_dir, {k: r.size for k, r in refs.items()}, source)
    names = list(refs)
    current = read_tensors(source, [refs[n] for n in names])
    patch_tensors(source, dest, [(refs[n], new[n].to(old.dtype)) for n, old in zip(names, current)])
    return new


def _load_dcp(folder: Path) -> dict[str, Any]:
    """Every item of a DCP folder, in one process (what ``format_utils.dcp_to_torch_save`` does)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP raises CheckpointException, OSError, pickle errors
        raise AdapterFileError(
            f"{folder}: cannot read the torch.distributed.checkpoint folder ({type(exc).__name__}); re-save it"
        ) from None
    return state


def _lora_entries(folder: Path, model: Mapping[str, Any]) -> dict[str, str]:
    entries = {}
    for key, value in model.items():
        name = lora_name(str(key))
        if name is not None and isinstance(value, torch.Tensor):
            entries[name] = str(key)
    if not entries:
        raise AdapterFileError(f"{folder}: no LoRA tensors in the FSDP checkpoint; was the run trained with a PEFT LoRA model?")
    return entries


def _model_dict(folder: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    model = state.get("model")
    if not isinstance(model, dict):
        raise AdapterFileError(f"{folder}: no 'model' entry; not an accelerate save_fsdp_model folder")
    return model


def load_sharded_lora_state(folder: Path) -> dict[str, torch.Tensor]:
    """The full LoRA tensors (PEFT names, stored dtype) of a ``pytorch_model_fsdp_N/`` DCP folder."""
    model = _model_dict(folder, _load_dcp(folder))
    return {name: model[key] for name, key in sorted(_lora_entries(folder, model).items())}


def rewrite_sharded(source: Path, dest: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Write ``dest`` (a new DCP folder) = ``source`` with the adapter's LoRA tensors (stored dtype)."""
    import torch.distributed.checkpoint as dcp

    state = _load_dcp(source)
    model = _model_dict(source, state)
    entries = _lora_entries(source, model)
    new = checked_new_weights(adapter_dir, {name: tuple(model[key].shape) for name, key in entries.items()}, source)
    for name, key in entries.items():
        model[key] = new[name].to(model[key].dtype).contiguous()
    with warnings.catch_warnings():  # "torch.distributed is disabled ... save in a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dest)), no_dist=True)
    LOG.debug("wrote %s", dest)
    return new
