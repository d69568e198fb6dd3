"""The committed synthetic fixtures are exactly what their script makes, and read as expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nextoffline.trajectory import load_trajectory
from tests.conftest import FIXTURES, tree_hashes


def test_synthetic_fixtures_are_reproducible(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(FIXTURES / "make_synthetic_fixtures.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("synthetic_linear", "synthetic_sqrt"):
        assert tree_hashes(tmp_path / name) == tree_hashes(FIXTURES / name)


def test_synthetic_fixture_layout() -> None:
    trajectory = load_trajectory(FIXTURES / "synthetic_linear")
    assert trajectory.format_name == "peft" and trajectory.step_numbers == list(range(10, 90, 10))
    assert len(trajectory.modules) == 14 and {m.rank for m in trajectory.modules} == {4}
    assert trajectory.modules[0].scaling == 2.0


def test_trl_grpo_fixture_is_a_real_trl_run() -> None:
    import json

    from safetensors.torch import load_file

    run = FIXTURES / "trl_grpo_tiny"
    trajectory = load_trajectory(run)
    assert trajectory.format_name == "trl" and trajectory.step_numbers == list(range(1, 9))
    for step in trajectory.step_numbers:
        ckpt = run / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt",
                     "rng_state.pth", "training_args.bin"):
            assert (ckpt / name).is_file(), (ckpt, name)
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    keys = load_file(run / "checkpoint-8" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    b7 = load_file(run / "checkpoint-7" / "adapter_model.safetensors")
    b8 = load_file(run / "checkpoint-8" / "adapter_model.safetensors")
    assert all(not __import__("torch").equal(b7[k], b8[k]) for k in b8 if k.endswith("lora_B.weight"))


def test_trl_fixture_loads_with_peft_offline() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny_base"), FIXTURES / "trl_grpo_tiny" / "checkpoint-8")
    assert model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.abs().sum() > 0
