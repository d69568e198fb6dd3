"""verl layouts the legacy reader used to refuse or miss: lora_adapter/ missing or empty at some steps, Megatron.

``verl_lora_tiny`` (verl <= 0.7, FSDP2, 2 ranks, ``lora_adapter/`` at every step) is edited the way
real runs break: verl swallows ``lora_adapter/`` save errors (the folder is missing at some steps),
and PEFT >= 0.21 with verl's per-layer summon saves an EMPTY adapter (``{}``). The FSDP shards
hold the LoRA at every step, and rank/alpha/targets come from any step's ``adapter_config.json``.
The Megatron backend's PEFT export (``actor/model/huggingface/adapter/``) is read as input;
``--resumable`` on Megatron is refused (``dist_ckpt/`` is not rewritten).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nextoffline.cli import main
from nextoffline.formats.verl import load_lora_state
from nextoffline.trajectory import load_trajectory
from tests.conftest import FIXTURES, REPO, tree_hashes

VERL = FIXTURES / "verl_lora_tiny"
STEPS = (2, 4, 6, 8)


def _copy(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    return run


def _cli(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["extrapolate", str(run), "--coef", "1", "--method", "linear", "--out", str(out), "-q", *extra])


def test_missing_lora_adapter_at_some_steps_falls_back_to_the_shards(tmp_path: Path) -> None:
    run = _copy(tmp_path)
    shutil.rmtree(run / "global_step_4" / "actor" / "lora_adapter")
    shutil.rmtree(run / "global_step_8" / "actor" / "lora_adapter")
    trajectory = load_trajectory(run)
    assert trajectory.step_numbers == list(STEPS)
    assert all(r.weights_file.name == "model_world_size_2_rank_0.pt" for r in trajectory.steps)
    assert trajectory.adapter_config["lora_alpha"] == 8 and trajectory.adapter_config["r"] == 4
    legacy = load_file(VERL / "global_step_6" / "actor" / "lora_adapter" / "adapter_model.safetensors")
    shards = load_lora_state(run / "global_step_6" / "actor" / "model_world_size_2_rank_0.pt")
    assert all(torch.equal(shards[k], legacy[k]) for k in legacy)


def test_empty_lora_adapter_falls_back_to_the_shards(tmp_path: Path) -> None:
    run = _copy(tmp_path)
    for step in STEPS:  # PEFT >= 0.21 + verl's layered summon: an adapter file without tensors
        save_file({}, str(run / f"global_step_{step}" / "actor" / "lora_adapter" / "adapter_model.safetensors"))
    trajectory = load_trajectory(run)
    assert trajectory.step_numbers == list(STEPS) and len(trajectory.modules) == 14
    assert trajectory.steps[-1].weights_file == run / "global_step_8" / "actor" / "model_world_size_2_rank_0.pt"
    result = _cli(run, tmp_path / "out", "--resumable")
    assert result.exit_code == 0, result.output
    new = load_file(tmp_path / "out" / "adapter_model.safetensors")
    actor = tmp_path / "out" / "resume" / "global_step_8" / "actor"
    assert load_lora_state(actor / "model_world_size_2_rank_0.pt").keys() == new.keys()
    assert all(torch.equal(load_lora_state(actor / "model_world_size_2_rank_0.pt")[k], new[k]) for k in new)
    filled = load_file(actor / "lora_adapter" / "adapter_model.safetensors")  # the empty export now holds the new adapter
    assert all(torch.equal(filled[k], new[k]) for k in new)


def test_no_config_anywhere_is_refused_in_one_line(tmp_path: Path) -> None:
    run = _copy(tmp_path)
    for step in STEPS:
        shutil.rmtree(run / f"global_step_{step}" / "actor" / "lora_adapter")
    result = _cli(run, tmp_path / "out")
    assert result.exit_code == 1 and "lora_train_meta.json: missing, so lora_alpha is unknown" in result.stderr


@pytest.mark.slow
def test_missing_adapter_run_resumes_with_the_extrapolation(tmp_path: Path) -> None:
    run = _copy(tmp_path)
    shutil.rmtree(run / "global_step_8" / "actor" / "lora_adapter")
    before = tree_hashes(run)
    result = _cli(run, tmp_path / "out", "--resumable")
    assert result.exit_code == 0, result.output
    assert tree_hashes(run) == before
    expected = tmp_path / "out" / "adapter_model.safetensors"
    old = load_lora_state(run / "global_step_8" / "actor" / "model_world_size_2_rank_0.pt")
    new = load_file(expected)
    assert any(not torch.equal(new[k], old[k]) for k in old)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    actor = tmp_path / "out" / "resume" / "global_step_8" / "actor"
    script = FIXTURES / "make_trainer_fixtures.py"
    subprocess.run([sys.executable, str(script), "check-verl", str(actor), str(expected), "2"], check=True, timeout=300, cwd=REPO, env=env)
    assert json.loads(expected.with_suffix(".json").read_text()) == {"ok": True, "steps": [8]}  # verl's FSDP2 load_state_dict


def _megatron_run(root: Path, export: bool) -> Path:
    """verl's Megatron layout: model/dist_ckpt/ (torch_dist shards) and, with PEFT, the model/huggingface/adapter/ export."""
    for step in STEPS:
        actor = root / f"global_step_{step}" / "actor"
        dist = actor / "model" / "dist_ckpt"
        dist.mkdir(parents=True)
        (dist / ".metadata").write_bytes(b"torch_dist metadata")
        torch.save({"shard": torch.zeros(2)}, dist / "__0_0.distcp")
        (actor / "optim" / "dist_ckpt").mkdir(parents=True)
        if export:
            shutil.copytree(VERL / f"global_step_{step}" / "actor" / "lora_adapter", actor / "model" / "huggingface" / "adapter")
    (root / "latest_checkpointed_iteration.txt").write_text("8")
    return root


def test_megatron_peft_export_is_read(tmp_path: Path) -> None:
    run = _megatron_run(tmp_path / "run", export=True)
    trajectory = load_trajectory(run)
    assert trajectory.format_name == "verl" and trajectory.step_numbers == list(STEPS)
    assert trajectory.steps[-1].adapter_dir == run / "global_step_8" / "actor" / "model" / "huggingface" / "adapter"
    result = _cli(run, tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_megatron_resumable_is_refused_naming_dist_ckpt(tmp_path: Path) -> None:
    run = _megatron_run(tmp_path / "run", export=True)
    before = tree_hashes(run)
    result = _cli(run, tmp_path / "out", "--resumable")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "global_step_8/actor/model/dist_ckpt: Megatron distributed checkpoint" in line
    assert "verl Megatron" in line and "old LoRA" in line
    assert not (tmp_path / "out").exists() and tree_hashes(run) == before


def test_megatron_without_export_names_the_layout(tmp_path: Path) -> None:
    run = _megatron_run(tmp_path / "run", export=False)
    result = _cli(run, tmp_path / "out")
    assert result.exit_code == 1 and "verl Megatron checkpoint without the PEFT export" in result.stderr
    assert "no checkpoints found" not in result.stderr
