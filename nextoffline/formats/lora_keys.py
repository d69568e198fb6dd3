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
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextoffline.artifacts import ADAPTER_WEIGHTS_NAME
from nextoffline.errors import AdapterFileError, IncompatibleCheckpointsError

__all__ = [
    "LORA_EMBEDDING_KEY",
    "LORA_KEY",
    "LoraKey",
    "checked_new_weights",
    "is_peft_lora_key",
    "match_lora_key",
    "peft_key",
    "read_safetensors",
    "rewrite_safetensors",
]

#: LoRA factor keys, as PEFT saves them (``...q_proj.lora_A.weight``) or as a live module state
#: dict holds them, with the adapter name (``...q_proj.lora_A.default.weight``).
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
#: The same for embedding LoRA (``...embed_tokens.lora_embedding_A[.default]``).
LORA_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?$")


class LoraKey(NamedTuple):
    """A parsed LoRA factor key."""

    module: str
    part: str  # "A" or "B"
    adapter: str | None  # None: PEFT's saved name
    embedding: bool


def match_lora_key(key: str) -> LoraKey | None:
    """The module, factor and adapter name of a LoRA factor key, or ``None`` for other keys."""
    for pattern, embedding in ((LORA_KEY, False), (LORA_EMBEDDING_KEY, True)):
        match = pattern.match(key)
        if match:
            return LoraKey(match["module"], match["part"], match["adapter"], embedding)
    return None


def is_peft_lora_key(key: str) -> bool:
    """A LoRA factor key as PEFT saves it (no adapter name)."""
    parsed = match_lora_key(key)
    return parsed is not None and parsed.adapter is None


def peft_key(state_key: str) -> str | None:
    """PEFT's saved name of a LoRA parameter of a module state dict, or ``None`` for other keys."""
    parsed = match_lora_key(state_key)
    if parsed is None or parsed.adapter is None:
        return None
    if parsed.embedding:
        return f"{parsed.module}.lora_embedding_{parsed.part}"
    return f"{parsed.module}.lora_{parsed.part}.weight"


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
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    tensors, _metadata = read_safetensors(path)
    lora = {k: v for k, v in tensors.items() if is_peft_lora_key(k)}
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
    lora = [k for k in tensors if is_peft_lora_key(k)]
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
