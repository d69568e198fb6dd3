"""TRL / HF Trainer layout: detection, round trip through --resumable with coefficient 0."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.formats import detect_format
from nextoffline.synthetic import SyntheticSpec, write_synthetic_trajectory
from nextoffline.trajectory import load_trajectory
from tests.conftest import tree_hashes

TRAINER_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


def make_trl_run(root: Path, steps=(2, 4, 6, 8)) -> Path:
    """Step folders as transformers.Trainer writes them around a PEFT adapter."""
    write_synthetic_trajectory(
        root, SyntheticSpec(steps=list(steps), law="sqrt", noise=0.02, dtype=torch.bfloat16), dir_pattern="checkpoint-{step}"
    )
    for step in steps:
        ckpt = root / f"checkpoint-{step}"
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [], "max_steps": 20}))
        torch.save({"state": {0: {"exp_avg": torch.full((4, 32), float(step))}}, "param_groups": [{"lr": 1e-3}]}, ckpt / "optimizer.pt")
        torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
        torch.save({"python": step}, ckpt / "rng_state.pth")
        (ckpt / "training_args.bin").write_bytes(b"args")
    return root


def test_trl_layout_is_detected_over_plain_peft(tmp_path: Path) -> None:
    run = make_trl_run(tmp_path / "run")
    assert detect_format(run).name == "trl"
    trajectory = load_trajectory(run)
    assert trajectory.step_numbers == [2, 4, 6, 8] and set(trajectory.dtypes.values()) == {"bfloat16"}


def test_resumable_round_trip_with_coefficient_zero(tmp_path: Path) -> None:
    run = make_trl_run(tmp_path / "run")
    before = tree_hashes(run)
    result = CliRunner().invoke(
        main, ["extrapolate", str(run), "--coef", "0", "--method", "linear", "--out", str(tmp_path / "out"), "--resumable", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert tree_hashes(run) == before
    resumed = tmp_path / "out" / "resume" / "checkpoint-8"
    assert "trainer.train(resume_from_checkpoint=" in result.stdout and str(resumed) in result.stdout
    for name in (*TRAINER_FILES, "adapter_config.json"):
        assert (resumed / name).read_bytes() == (run / "checkpoint-8" / name).read_bytes(), name
    written, original = load_file(resumed / "adapter_model.safetensors"), load_file(run / "checkpoint-8" / "adapter_model.safetensors")
    assert written.keys() == original.keys()
    for key in original:
        assert written[key].dtype == original[key].dtype
        torch.testing.assert_close(written[key].float(), original[key].float(), rtol=1e-2, atol=1e-3)
    again = load_trajectory(tmp_path / "out" / "resume", min_steps=1)  # read the written layout back
    assert again.format_name == "trl" and again.step_numbers == [8] and again.modules == load_trajectory(run).modules


def test_resumable_with_update_changes_only_the_adapter(tmp_path: Path) -> None:
    run = make_trl_run(tmp_path / "run")
    result = CliRunner().invoke(
        main, ["extrapolate", str(run), "--coef", "1", "--method", "power", "--out", str(tmp_path / "out"), "--resumable", "-q"]
    )
    assert result.exit_code == 0, result.output
    resumed = tmp_path / "out" / "resume" / "checkpoint-8"
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in (run / "checkpoint-8").iterdir())
    written = load_file(resumed / "adapter_model.safetensors")
    assert torch.equal(written[next(iter(written))], load_file(tmp_path / "out" / "adapter_model.safetensors")[next(iter(written))])
    original = load_file(run / "checkpoint-8" / "adapter_model.safetensors")
    assert any(not torch.equal(written[k], original[k]) for k in original)
    manifest = json.loads((tmp_path / "out" / "nextoffline.json").read_text())
    assert manifest["resume"]["format"] == "trl" and manifest["resume"]["checkpoint_dir"] == "resume/checkpoint-8"
