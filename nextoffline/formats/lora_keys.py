"""LoRA key names and adapter weights shared by the trainer-native layouts (verl, OpenRLHF).

Trainers save the live module state dict, where a LoRA parameter carries the adapter name
(``...q_proj.lora_A.default.weight``); PEFT's ``adapter_model.safetensors`` drops it
(``...q_proj.lora_A.weight``). :func:`peft_key` maps the first to the second.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextoffline.errors import AdapterFileError, IncompatibleCheckpointsError

__all__ = ["ADAPTER_WEIGHTS", "PEFT_LORA_KEY", "checked_new_weights", "peft_key", "read_safetensors", "rewrite_safetensors"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STATE_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_STATE_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)$")
#: LoRA keys as PEFT saves them (adapter name removed).
PEFT_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def peft_key(state_key: str) -> str | None:
    """PEFT's saved name of a LoRA parameter of a module state dict, or ``None`` for other keys."""
    match = _STATE_KEY.match(state_key)
    if match:
        return f"{match['module']}.{match['part']}.weight"
    match = _STATE_EMBEDDING_KEY.match(state_key)
    if match:
        return f"{match['module']}.{match['part']}"
    return None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a (small) safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterFileError(f"{path}: cannot read safetensors file ({exc}); re-save it") from None


def checked_new_weights(adapter_dir: Path, expected: Mapping[str, tuple[int, ...]], source: Path) -> dict[str, torch.Tensor]:
    """The finished adapter's LoRA tensors, checked against a checkpoint's LoRA keys and shapes.

    Raises:
        IncompatibleCheckpointsError: keys or shapes differ (another run, or another rank).
    """
    path = adapter_dir / ADAPTER_WEIGHTS
    tensors, _metadata = read_safetensors(path)
    lora = {k: v for k, v in tensors.items() if PEFT_LORA_KEY.match(k)}
    missing, extra = sorted(set(expected) - set(lora)), sorted(set(lora) - set(expected))
    if missing or extra:
        raise IncompatibleCheckpointsError(
            f"{path}: LoRA keys differ from {source} (missing {missing[:3]}, extra {extra[:3]}); write the adapter from this run"
        )
    for key, shape in expected.items():
        if tuple(lora[key].shape) != tuple(shape):
            raise IncompatibleCheckpointsError(
                f"{path}: {key} has shape {tuple(lora[key].shape)}, the checkpoint {tuple(shape)}; "
                "--resumable needs the rank of the run (do not use the rank+1 option)"
            )
    return lora


def rewrite_safetensors(source: Path, dest: Path, new: Mapping[str, torch.Tensor]) -> None:
    """Write ``source`` to ``dest`` with its LoRA tensors replaced: same keys, dtype and metadata.

    A plain copy when the values do not change, so a round trip is byte-identical.
    """
    tensors, metadata = read_safetensors(source)
    lora = [k for k in tensors if PEFT_LORA_KEY.match(k)]
    if set(lora) != set(new):
        raise IncompatibleCheckpointsError(
            f"{source}: LoRA keys differ from the trainer checkpoint; the adapter folder is from another run"
        )
    updated = dict(tensors)
    updated.update({k: new[k].to(tensors[k].dtype).contiguous() for k in lora})
    if all(torch.equal(updated[k], tensors[k]) for k in lora):
        shutil.copyfile(source, dest)
    else:
        save_file(updated, str(dest), metadata=metadata or None)
