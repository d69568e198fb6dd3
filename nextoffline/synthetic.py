"""Synthetic LoRA trajectories with a known law, for tests, fixtures, examples and benchmarks.

``dW_t = s * B_t @ A_t`` with ``B_t = law(p) * B0 + noise`` and a fixed ``A0`` (plus optional
drift), written as step-named PEFT folders exactly as ``save_pretrained`` lays them out.
``p`` is the step, or with a learning-rate schedule (linear warmup, then linear decay, as
Hugging Face's default) the cumulative learning rate in peak-rate steps; the schedule is then
logged in a ``trainer_state.json`` per folder. With ``rotation`` the left factor turns at that
many radians per step (``cos(w t) B0 + sin(w t) B1``) while it grows.
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

__all__ = [
    "LAWS",
    "ForecastFamily",
    "SyntheticSpec",
    "forecast_families",
    "learning_rate",
    "progress",
    "qwen_like_modules",
    "synthetic_factors",
    "tiny_modules",
    "write_synthetic_trajectory",
]

LAWS: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "sqrt": math.sqrt,
    "log": math.log1p,
    "saturating": lambda t: 1.0 - math.exp(-t / 100.0),
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
    rotation: float = 0.0
    warmup: int = 0
    total_steps: int = 0  # > 0: linear warmup over ``warmup`` steps, then linear decay to 0 at this step
    log_every: int = 5


def learning_rate(spec: SyntheticSpec, step: float) -> float:
    """The schedule's rate at ``step`` relative to the peak (1.0 without a schedule)."""
    if spec.total_steps <= 0:
        return 1.0
    if step < spec.warmup:
        return step / spec.warmup
    return max(0.0, (spec.total_steps - step) / (spec.total_steps - spec.warmup))


def progress(spec: SyntheticSpec, step: float) -> float:
    """The law's argument: the step, or the cumulative learning rate (exact integral) with a schedule."""
    if spec.total_steps <= 0:
        return float(step)
    w, total = spec.warmup, spec.total_steps
    if step <= w:
        return step * step / (2 * w) if w else 0.0
    end = min(step, total)
    decay = (end - w) - ((end - w) ** 2) / (2 * (total - w))
    return w / 2 + decay


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
    magnitude = LAWS[spec.law](progress(spec, step))
    if spec.rotation:
        b1 = torch.randn(out, spec.rank, generator=gen, dtype=torch.float64) / math.sqrt(spec.rank)
        b0 = math.cos(spec.rotation * step) * b0 + math.sin(spec.rotation * step) * b1
    b = magnitude * b0 + noise
    a = a0 + spec.a_drift * magnitude * a_dir
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
        if spec.total_steps > 0:
            _write_trainer_state(folder, spec, step)
        folders.append(folder)
    return folders


def _write_trainer_state(folder: Path, spec: SyntheticSpec, step: int) -> None:
    """A Hugging Face ``trainer_state.json`` whose ``log_history`` holds the schedule up to ``step``."""
    logged = [s for s in range(spec.log_every, step + 1, spec.log_every)]
    history = [{"step": s, "learning_rate": round(1e-5 * learning_rate(spec, s), 12), "loss": 0.0} for s in logged]
    state = {"global_step": step, "max_steps": spec.total_steps, "logging_steps": spec.log_every, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


@dataclass
class ForecastFamily:
    """A trajectory law to forecast: the observed checkpoints and the true future ones."""

    spec: SyntheticSpec  # steps = the observed checkpoints
    future: list[int]
    what: str


def forecast_families() -> dict[str, ForecastFamily]:
    """The families of ``fixtures/forecast/`` (12 observed checkpoints, the future to twice the run)."""
    modules = tiny_modules(layers=1)
    even, future = list(range(10, 130, 10)), list(range(130, 250, 10))
    uneven = [10, 15, 20, 30, 35, 50, 60, 65, 80, 100, 105, 120]

    def spec(**kw) -> SyntheticSpec:
        return SyntheticSpec(steps=kw.pop("steps", even), modules=modules, a_drift=kw.pop("a_drift", 0.05), **kw)

    return {
        "saturating": ForecastFamily(spec(law="saturating", noise=0.01), future, "1 - exp(-t/100): growth that levels off"),
        "rotating": ForecastFamily(spec(law="linear", rotation=0.004, a_drift=0.0), future, "linear growth while B turns 0.004 rad/step"),
        "noisy": ForecastFamily(
            spec(law="sqrt", noise=1.0, a_drift=0.01), future, "sqrt(t) under per-checkpoint noise larger than a step's movement"
        ),
        "uneven": ForecastFamily(spec(law="sqrt", noise=0.01, a_drift=0.01, steps=uneven), future, "sqrt(t) saved at uneven steps"),
        "schedule": ForecastFamily(
            spec(law="linear", noise=0.01, a_drift=0.0, warmup=30, total_steps=400),
            future,
            "linear in the cumulative learning rate: warmup 30 steps, linear decay to 0 at step 400 (trainer_state.json)",
        ),
    }
