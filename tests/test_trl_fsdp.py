"""TRL / transformers.Trainer + accelerate FSDP: --resumable rewrites the files load_fsdp_model reads.

Fixtures ``trl_fsdp_full_tiny`` (FULL_STATE_DICT: ``pytorch_model_fsdp.bin`` + adapter files) and
``trl_fsdp_sharded_tiny`` (SHARDED_STATE_DICT: the DCP folder ``pytorch_model_fsdp_0/``, no adapter
file) come from ``fixtures/make_fsdp_fixtures.py``: FSDP2 on 2 CPU ranks, saved with accelerate's own
``save_fsdp_model(..., adapter_only=True)``. The resume tests load the written checkpoint with
accelerate's ``load_fsdp_model(..., adapter_only=True)`` (what ``Trainer._load_from_checkpoint`` calls)
in 2 processes and compare the LoRA weights with the extrapolated adapter.
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
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.formats.accelerate_fsdp import load_sharded_lora_state
from nextoffline.io.torch_zip import read_structure, read_tensors
from nextoffline.trajectory import load_trajectory
from tests.conftest import FIXTURES, REPO, extrapolate_resumable

FULL = FIXTURES / "trl_fsdp_full_tiny"
SHARDED = FIXTURES / "trl_fsdp_sharded_tiny"


def _sharded_run(tmp_path: Path) -> Path:
    """The sharded run plus the adapter_config.json the user writes (the checkpoints hold none)."""
    run = tmp_path / "run"
    shutil.copytree(SHARDED, run)
    shutil.copyfile(FULL / "checkpoint-8" / "adapter_config.json", run / "adapter_config.json")  # same LoraConfig (r=4, alpha=8)
    return run


def _accelerate_load(checkpoints: list[Path], expected: Path, kind: str) -> list[bool]:
    """accelerate's load_fsdp_model on each checkpoint (2 processes): does the loaded LoRA equal ``expected``?"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "DS_ACCELERATOR": "cpu"}
    script = FIXTURES / "make_fsdp_fixtures.py"
    paths = os.pathsep.join(str(c) for c in checkpoints)
    subprocess.run([sys.executable, str(script), "check", paths, str(expected), kind], check=True, timeout=600, cwd=REPO, env=env)
    return json.loads(expected.with_suffix(".json").read_text())["ok"]


def _changed(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> bool:
    assert new.keys() == old.keys()
    return any(not torch.equal(new[k].float(), old[k].float()) for k in old)


def test_sharded_run_without_adapter_files_is_read_from_the_dcp_folder(tmp_path: Path) -> None:
    run = _sharded_run(tmp_path)
    trajectory = load_trajectory(run)
    assert trajectory.format_name == "trl" and trajectory.step_numbers == [2, 4, 6, 8] and len(trajectory.modules) == 14
    lora = load_sharded_lora_state(run / "checkpoint-8" / "pytorch_model_fsdp_0")
    assert len(lora) == 28 and all(v.dtype == torch.float32 for v in lora.values())


def test_sharded_run_without_config_is_refused_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["extrapolate", str(SHARDED), "--coef", "1", "--method", "linear", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "SHARDED_STATE_DICT" in result.stderr and "lora_alpha is unknown" in result.stderr
    assert not (tmp_path / "o").exists()


def test_full_state_dict_rewrite_changes_only_lora_bytes(tmp_path: Path) -> None:
    extrapolate_resumable(FULL, tmp_path / "out")
    written = tmp_path / "out" / "resume" / "checkpoint-8"
    new = load_file(tmp_path / "out" / "adapter_model.safetensors")
    source = FULL / "checkpoint-8" / "pytorch_model_fsdp.bin"
    state = read_structure(written / "pytorch_model_fsdp.bin")
    values = dict(zip(state, read_tensors(written / "pytorch_model_fsdp.bin", list(state.values()))))
    assert all(
        torch.equal(values[k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")], v)
        for k, v in new.items()
    )
    assert _changed(new, load_file(FULL / "checkpoint-8" / "adapter_model.safetensors"))
    for name in ("optimizer.bin", "scheduler.pt", "trainer_state.json", "rng_state_0.pth"):
        assert (written / name).read_bytes() == (FULL / "checkpoint-8" / name).read_bytes(), name
    assert read_structure(written / "pytorch_model_fsdp.bin").keys() == read_structure(source).keys()


@pytest.mark.slow
def test_full_state_dict_resumes_with_the_extrapolation(tmp_path: Path) -> None:
    extrapolate_resumable(FULL, tmp_path / "out")
    expected = tmp_path / "out" / "adapter_model.safetensors"
    assert _changed(load_file(expected), load_file(FULL / "checkpoint-8" / "adapter_model.safetensors"))
    assert _accelerate_load([tmp_path / "out" / "resume" / "checkpoint-8"], expected, "full") == [True]


@pytest.mark.slow
def test_sharded_state_dict_resumes_with_the_extrapolation(tmp_path: Path) -> None:
    run = _sharded_run(tmp_path)
    stdout = extrapolate_resumable(run, tmp_path / "out")
    checkpoint = tmp_path / "out" / "resume" / "checkpoint-8"
    assert f"resume_from_checkpoint={str(checkpoint)!r}" in stdout
    assert not (checkpoint / "adapter_model.safetensors").exists()  # the layout stays the trainer's: DCP only
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in (run / "checkpoint-8").iterdir())
    expected = tmp_path / "out" / "adapter_model.safetensors"
    old = load_sharded_lora_state(run / "checkpoint-8" / "pytorch_model_fsdp_0")
    assert _changed(load_file(expected), old)
    # the written checkpoint resumes the extrapolation; the unchanged source (what a copy would give) does not
    assert _accelerate_load([checkpoint, run / "checkpoint-8"], expected, "sharded") == [True, False]
