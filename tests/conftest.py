"""Shared fixtures: seeded synthetic trajectories and a tiny local base model (no network)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nextoffline.synthetic import SyntheticSpec, write_synthetic_trajectory

pytest_plugins = ["tests.conftest_hub"]  # hub_server / hub_env fixtures (local Hub-compatible server)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_trajectory(root: Path, **spec_kwargs) -> Path:
    """Write a synthetic PEFT trajectory (steps 10..80 by default) and return its folder."""
    spec_kwargs.setdefault("steps", list(range(10, 90, 10)))
    write_synthetic_trajectory(root, SyntheticSpec(**spec_kwargs))
    return root


@pytest.fixture
def linear_run(tmp_path: Path) -> Path:
    return make_trajectory(tmp_path / "linear_run", law="linear")


@pytest.fixture
def sqrt_run(tmp_path: Path) -> Path:
    return make_trajectory(tmp_path / "sqrt_run", law="sqrt")


def effective(tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Dense ``s B A`` per module (fine for tiny test shapes)."""
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = scaling * tensors[f"{module}.lora_B.weight"].double() @ a.double()
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (inputs must never change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def extrapolate_resumable(run: Path, out: Path) -> str:
    """``extrapolate RUN --coef 1 --method linear --resumable`` through the CLI; the input must stay unchanged."""
    from click.testing import CliRunner

    from nextoffline.cli import main

    before = tree_hashes(run)
    result = CliRunner().invoke(
        main, ["extrapolate", str(run), "--coef", "1", "--method", "linear", "--out", str(out), "--resumable", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert tree_hashes(run) == before
    return result.stdout


def torchrun_cli(args: list[str], *, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m nextoffline ARGS`` (gloo, one thread per process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*torchrun, "-m", "nextoffline", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 32, 2 layers, kv dim 16, intermediate 48) matching ``synthetic.tiny_modules``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path
