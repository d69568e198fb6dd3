"""Live LoRA parameters of a training process: in-place writes, DDP broadcast, optimizer moments.

Trainer-agnostic (torch and PEFT only, imported lazily); :mod:`nextoffline.integrations.trl`
builds the Hugging Face ``Trainer`` callback on it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from nextoffline.errors import UsageError

__all__ = ["MOMENT_POLICIES", "LiveLora", "adjust_moments", "broadcast_from_main", "rng_preserved"]

MOMENT_POLICIES = ("keep", "rescale", "reset")
#: Adam-family moment keys and the power of the gradient scale each one carries.
_MOMENT_POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


class LiveLora:
    """The trainable LoRA parameters of a PEFT model, keyed like its saved adapter.

    Keys are those of ``get_peft_model_state_dict`` (what ``adapter_model.safetensors`` holds);
    values are the model's own ``Parameter`` objects, so writes land in place and the optimizer
    keeps its references.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params

    @classmethod
    def from_model(cls, model: Any) -> LiveLora:
        """Map saved adapter keys to parameters by storage (no assumption on PEFT's key renaming).

        Raises:
            UsageError: not a PEFT LoRA model with one active adapter.
        """
        from peft import PeftModel, get_peft_model_state_dict

        if not isinstance(model, PeftModel):
            raise UsageError(
                f"ExtrapolationCallback needs a PEFT model (got {type(model).__name__}); pass peft_config=LoraConfig(...) to the trainer"
            )
        adapters = list(model.active_adapters)
        if len(adapters) != 1:
            raise UsageError(f"ExtrapolationCallback: {len(adapters)} active adapters ({adapters}); train one LoRA adapter at a time")
        peft_type = str(getattr(model.peft_config[adapters[0]], "peft_type", "LORA"))
        if "LORA" not in peft_type.upper():
            raise UsageError(f"ExtrapolationCallback: adapter type {peft_type} is not supported; use plain LoRA")
        by_storage = {(p.data_ptr(), tuple(p.shape)): p for p in model.parameters()}
        params = {}
        for key, value in get_peft_model_state_dict(model, adapter_name=adapters[0]).items():
            param = by_storage.get((value.data_ptr(), tuple(value.shape)))
            if param is not None and param.requires_grad:
                params[key] = param
        if not params:
            raise UsageError("ExtrapolationCallback: the model has no trainable LoRA parameters")
        return cls(params)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Detached copies of every parameter."""
        return {key: p.detach().clone() for key, p in self.params.items()}

    def load(self, tensors: Mapping[str, torch.Tensor], *, source: str) -> None:
        """Copy ``tensors`` into the parameters in place (cast to each parameter's device and dtype).

        Raises:
            UsageError: a LoRA parameter of the model has no tensor, or shapes differ.
        """
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise UsageError(f"{source}: no tensor for {missing[0]} (and {len(missing) - 1} more); the adapter does not match the model")
        with torch.no_grad():
            for key, param in self.params.items():
                value = tensors[key]
                if tuple(value.shape) != tuple(param.shape):
                    raise UsageError(f"{source}: {key} has shape {tuple(value.shape)}, the model's is {tuple(param.shape)}")
                param.copy_(value.to(device=param.device, dtype=param.dtype))


def broadcast_from_main(lora: LiveLora, applied: bool) -> bool:
    """Under ``torch.distributed``, send the main process's decision and LoRA values to every rank.

    Every rank must call this at the same point (it is a collective). Single process: returns
    ``applied`` unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return applied
    flag = torch.tensor([1 if applied else 0], dtype=torch.int64, device=lora.device)
    dist.broadcast(flag, src=0)
    if not int(flag.item()):
        return False
    with torch.no_grad():
        for param in lora.params.values():
            dist.broadcast(param.data, src=0)
    return True


def _pair_key(key: str) -> str | None:
    """The other factor's key of a LoRA pair (``lora_A`` <-> ``lora_B``)."""
    for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        if f".{a}" in key:
            return key.replace(f".{a}", f".{b}")
        if f".{b}" in key:
            return key.replace(f".{b}", f".{a}")
    return None


def adjust_moments(optimizer: Any, lora: LiveLora, before: Mapping[str, torch.Tensor], policy: str) -> int:
    """Adjust the optimizer state of the LoRA parameters after a jump; returns how many were changed.

    - ``keep``: nothing changes (Adam moments keep the run's gradient statistics).
    - ``reset``: every state tensor shaped like its parameter is zeroed and ``step`` is set to 0,
      so Adam's bias correction restarts (as for a fresh parameter).
    - ``rescale``: the gradient of ``B`` scales with ``A`` and that of ``A`` with ``B``
      (``dL/dB = s G A^T``, ``dL/dA = s B^T G``), so each factor's first moment is multiplied by
      ``|other_new| / |other_old|`` and second moments by its square.
    """
    if policy not in MOMENT_POLICIES:
        raise UsageError(f"optimizer_moments={policy!r}: use one of {', '.join(MOMENT_POLICIES)}")
    if policy == "keep" or optimizer is None:
        return 0
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", {})
    changed = 0
    with torch.no_grad():
        for key, param in lora.params.items():
            entry = state.get(param)
            if not entry:
                continue
            if policy == "reset":
                _reset_entry(entry, param)
            else:
                other = _pair_key(key)
                if other is None or other not in before:
                    continue
                old = float(before[other].float().norm())
                ratio = float(lora.params[other].detach().float().norm()) / old if old > 0 else 1.0
                for name, power in _MOMENT_POWERS.items():
                    if torch.is_tensor(entry.get(name)):
                        entry[name].mul_(ratio**power)
            changed += 1
    return changed


def _reset_entry(entry: dict[str, Any], param: torch.Tensor) -> None:
    for name, value in list(entry.items()):
        if name == "step":
            entry[name] = torch.zeros_like(value) if torch.is_tensor(value) else 0
        elif torch.is_tensor(value) and value.shape == param.shape:
            value.zero_()


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Run a block without disturbing the Python, NumPy and torch (CPU and this CUDA device) RNG streams."""
    py_state = random.getstate()
    np_state = None
    with contextlib.suppress(ImportError):
        import numpy

        np_state = numpy.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            numpy.random.set_state(np_state)
