"""Shared helpers of the benchmarks: a cached 7B-shaped LoRA trajectory, page-cache warming, RSS.

The trajectory is generated once per parameter set under ``<tempdir>/nextoffline-bench/<key>/``
(``key`` hashes the parameters and the generator version) in TRL layout:
``checkpoint-N/adapter_model.safetensors`` + ``adapter_config.json`` + ``trainer_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextoffline.synthetic import qwen_like_modules

GENERATOR_VERSION = 2


@dataclass(frozen=True)
class TrajectoryParams:
    """What to generate; the defaults are Qwen2.5-7B shapes with r=64, bf16, 16 checkpoints."""

    layers: int = 28
    hidden: int = 3584
    intermediate: int = 18944
    kv_dim: int = 512  # 4 KV heads of 128
    rank: int = 64
    alpha: int = 128
    checkpoints: int = 16
    every: int = 10
    seed: int = 0

    @classmethod
    def preset(cls, quick: bool) -> TrajectoryParams:
        return cls(layers=4, checkpoints=8) if quick else cls()

    @property
    def key(self) -> str:
        text = json.dumps({**asdict(self), "v": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def modules(self) -> list[tuple[str, int, int]]:
        return qwen_like_modules(layers=self.layers, hidden=self.hidden, intermediate=self.intermediate, kv_dim=self.kv_dim)

    def bytes_per_checkpoint(self) -> int:
        return sum((out + inp) * self.rank * 2 for _name, out, inp in self.modules())


def bench_root() -> Path:
    return Path(tempfile.gettempdir()) / "nextoffline-bench"


def _adapter_config(params: TrajectoryParams) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct",
        "r": params.rank,
        "lora_alpha": params.alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "inference_mode": False,
    }


def ensure_trajectory(params: TrajectoryParams, *, log=print) -> Path:
    """The cached trajectory folder for ``params`` (generated on first use)."""
    root = bench_root() / params.key
    if (root / "COMPLETE").is_file():
        return root
    need = params.bytes_per_checkpoint() * params.checkpoints
    free = shutil.disk_usage(bench_root().parent).free
    if free < need * 1.2:
        raise SystemExit(f"not enough space in {bench_root().parent}: need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"generating {params.checkpoints} checkpoints x {params.bytes_per_checkpoint() / 2**20:.0f} MiB into {root} ...")
    start = time.perf_counter()
    _generate(tmp, params)
    (tmp / "params.json").write_text(json.dumps(asdict(params), indent=2) + "\n")
    (tmp / "COMPLETE").write_text("ok\n")
    tmp.rename(root)
    log(f"generated in {time.perf_counter() - start:.1f} s")
    return root


def _generate(root: Path, params: TrajectoryParams) -> None:
    """A realistic-ish RL LoRA trajectory, cheap to generate.

    Per module: ``B_t = g(t) (P + 0.3 N) + 0.05 sqrt(t/T) roll(N, t)`` with ``P`` a rank-1 dominant
    direction (outer product) and ``N`` fixed noise (rolled so every step gets a different
    perturbation without new random numbers); ``A_t = A_0 + 0.02 (t/T) roll(A_0, 7)`` (slow drift).
    """
    gen = torch.Generator().manual_seed(params.seed)
    r = params.rank
    base = []
    for _name, out, inp in params.modules():
        p = torch.randn(out, 1, generator=gen) * torch.randn(1, r, generator=gen) / math.sqrt(r)
        noise = torch.randn(out, r, generator=gen) / math.sqrt(r)
        a0 = (torch.rand(r, inp, generator=gen) * 2 - 1) / math.sqrt(inp)  # kaiming-uniform-like LoRA A init
        base.append((p.to(torch.bfloat16), noise.to(torch.bfloat16), a0.to(torch.bfloat16)))
    steps = [params.every * (i + 1) for i in range(params.checkpoints)]
    total = steps[-1]
    config = _adapter_config(params)
    for step in steps:
        frac = step / total
        tensors = {}
        for (name, _out, _inp), (p, noise, a0) in zip(params.modules(), base):
            pf, nf = p.float(), noise.float()
            b = (2e-3 * frac) * (pf + 0.3 * nf) + (1e-4 * math.sqrt(frac)) * torch.roll(nf, step, 0)
            a = a0.float() + (0.02 * frac) * torch.roll(a0.float(), 7, 1)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
        folder = root / f"checkpoint-{step}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {"global_step": step, "max_steps": total, "epoch": frac, "log_history": [], "save_steps": params.every}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def weight_files(root: Path) -> list[Path]:
    return sorted(root.glob("checkpoint-*/adapter_model.safetensors"), key=lambda p: int(p.parent.name.split("-")[1]))


def warm_page_cache(files: list[Path], block: int = 16 * 2**20) -> int:
    """Read every byte once into a fixed buffer (no RSS growth); returns the bytes read."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    total = 0
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while True:
                n = handle.readinto(view)
                if not n:
                    break
                total += n
    return total


def peak_rss_gb() -> float:
    """This process' peak resident set (VmHWM) in GB (10^9 bytes)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def run_child(script: Path, args: list[str], *, env: dict | None = None) -> dict:
    """Run ``script --child ...`` in a fresh interpreter; its last stdout line is a JSON dict."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description() -> dict:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": cuda,
        "load_1min": round(load, 2),
        "python": platform.python_version(),
    }


def best(values: list[float]) -> float:
    return min(values)
