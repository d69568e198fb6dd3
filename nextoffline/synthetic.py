"""Synthetic LoRA trajectories with a known law, for tests, fixtures, examples and benchmarks.

``dW_t = s * B_t @ A_t`` with ``B_t = law(t) * B0 + noise`` and a fixed ``A0`` (plus optional
drift), written as step-named PEFT folders exactly as ``save_pretrained`` lays them out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from nextoffline.io.writer import write_safetensors

__all__ = ["LAWS", "SyntheticSpec", "qwen_like_modules", "synthetic_factors", "tiny_modules", "write_synthetic_trajectory"]

LAWS: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "sqrt": math.sqrt,
    "log": math.log1p,
    "quadratic": lambda t: t * t,
    "constant": lambda t: 1.0,
}


def tiny_modules(layers: int = 2, hidden: int = 32, intermediate: int = 48, kv: int = 16) -> list[tuple[str, int, int]]:
    """``(module name, out, in)`` of a small Llama-like model."""
    return qwen_like_modules(layers=layers, hidden=hidden, intermediate=intermediate, kv_dim=kv)


def qwen_like_modules(*, layers: int, hidden: int, intermediate: int, kv_dim: int) -> list[tuple[str, int, int]]:
    """``(module name, out, in)`` of the q,k,v,o,gate,up,down projections of a decoder."""
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv_dim, hidden),
        "self_attn.v_proj": (kv_dim, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    return [(f"model.layers.{i}.{name}", out, inp) for i in range(layers) for name, (out, inp) in shapes.items()]


@dataclass
class SyntheticSpec:
    """What to generate. ``law`` maps a step to the magnitude of the rank-r update."""

    steps: Sequence[int]
    modules: Sequence[tuple[str, int, int]] = field(default_factory=tiny_modules)
    rank: int = 4
    alpha: float = 8.0
    law: str = "linear"
    noise: float = 0.0
    a_drift: float = 0.0
    dtype: torch.dtype = torch.float32
    seed: int = 0
    use_rslora: bool = False


def synthetic_factors(spec: SyntheticSpec, step: int, module_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic ``(B_t, A_t)`` in float64 for one module at one step."""
    _name, out, inp = spec.modules[module_index]
    gen = torch.Generator().manual_seed(spec.seed * 100_003 + module_index)
    b0 = torch.randn(out, spec.rank, generator=gen, dtype=torch.float64) / math.sqrt(spec.rank)
    a0 = torch.randn(spec.rank, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)
    b_noise_dir = torch.randn(out, spec.rank, generator=gen, dtype=torch.float64)
    a_dir = torch.randn(spec.rank, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)
    step_gen = torch.Generator().manual_seed(spec.seed * 7_919 + module_index * 104_729 + step)
    noise = spec.noise * torch.randn(out, spec.rank, generator=step_gen, dtype=torch.float64) if spec.noise else 0.0 * b_noise_dir
    b = LAWS[spec.law](float(step)) * b0 + noise
    a = a0 + spec.a_drift * LAWS[spec.law](float(step)) * a_dir
    return b, a


def write_synthetic_trajectory(root: Path, spec: SyntheticSpec, *, dir_pattern: str = "step_{step}") -> list[Path]:
    """Write one PEFT adapter folder per step under ``root``; returns the folders."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "use_rslora": spec.use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _o, _i in spec.modules}),
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "inference_mode": True,
    }
    folders = []
    for step in spec.steps:
        folder = root / dir_pattern.format(step=step)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for index, (name, _out, _inp) in enumerate(spec.modules):
            b, a = synthetic_factors(spec, step, index)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(spec.dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(spec.dtype)
        write_safetensors(folder / ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
        (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        folders.append(folder)
    return folders
