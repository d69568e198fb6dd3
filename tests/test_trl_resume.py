"""A real TRL GRPO + LoRA run resumed from `nextoffline extrapolate --resumable` (CPU, tiny model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from tests.conftest import FIXTURES, tree_hashes
from tests.tiny_models import run_tiny_grpo

pytest.importorskip("trl")


class CaptureStart:
    """TrainerCallback recording the LoRA weights when (resumed) training begins."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.start_step = -1

    def __getattr__(self, name: str):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        from peft import get_peft_model_state_dict

        self.start_step = state.global_step
        self.weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.slow
def test_trl_resumes_from_extrapolated_checkpoint(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "tiny_base", base)
    run = tmp_path / "run"
    run_tiny_grpo(run, base_dir=base, max_steps=4, save_steps=1)
    before = tree_hashes(run)

    out = tmp_path / "next"
    result = CliRunner().invoke(
        main, ["extrapolate", str(run), "--coef", "1", "--method", "linear", "--out", str(out), "--resumable", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert tree_hashes(run) == before
    checkpoint = out / "resume" / "checkpoint-4"
    assert f"resume_from_checkpoint={str(checkpoint)!r}" in result.stdout

    capture = CaptureStart()
    trainer = run_tiny_grpo(
        tmp_path / "resumed", base_dir=base, max_steps=6, save_steps=1, resume_from_checkpoint=str(checkpoint), callbacks=[capture]
    )
    extrapolated = load_file(out / "adapter_model.safetensors")
    last_real = load_file(run / "checkpoint-4" / "adapter_model.safetensors")
    assert capture.start_step == 4 and trainer.state.global_step == 6
    assert capture.weights.keys() == extrapolated.keys()
    for key, value in extrapolated.items():
        torch.testing.assert_close(capture.weights[key], value, rtol=0, atol=0)
    assert any(not torch.equal(extrapolated[k], last_real[k]) for k in extrapolated)
    assert (tmp_path / "resumed" / "checkpoint-6" / "adapter_model.safetensors").is_file()
