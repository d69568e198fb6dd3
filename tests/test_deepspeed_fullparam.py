"""Full-parameter DeepSpeed states (OpenRLHF ``_actor/global_stepN/``, HF Trainer ``checkpoint-N/global_stepN/``).

Fixtures ``ds_fullparam_zero2`` / ``ds_fullparam_zero3`` (``fixtures/make_deepspeed_fullparam_fixture.py``): a real
DeepSpeed bf16 engine on 2 CPU ranks (gloo) whose weights follow a known law, with per-step updates mostly below
bf16 resolution, saved by ``engine.save_checkpoint``. The fp32 masters are read where DeepSpeed's own
``zero_to_fp32`` finds them; ``--resumable`` is resumed by DeepSpeed's ``engine.load_checkpoint``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nextoffline.cli import main
from nextoffline.dense.layout import is_dense_source, load_dense_trajectory, reader_of
from nextoffline.dense.stream import FileHandles, read_slab
from tests.conftest import FIXTURES, REPO, torchrun_cli, tree_hashes

sys.path.insert(0, str(FIXTURES))
from make_deepspeed_fullparam_fixture import law_weights

Z2, Z3 = FIXTURES / "ds_fullparam_zero2", FIXTURES / "ds_fullparam_zero3"
NEEDS_DS = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
TARGET = 40  # steps 1..6 saved: a long horizon, so the law moves the weights by several bf16 ulps


def run_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    return result.exit_code, result.output


def truth(run: Path, step: float) -> dict[str, torch.Tensor]:
    return law_weights(load_file(run / "base" / "model.safetensors"), step)


def ratio(out: dict[str, torch.Tensor], latest: dict[str, torch.Tensor], law: dict[str, torch.Tensor]) -> float:
    """Distance to the law relative to stopping at the latest checkpoint (1.0 = no better)."""
    num = sum(float((out[k].detach().double() - law[k].double()).square().sum()) for k in law)
    den = sum(float((latest[k].detach().double() - law[k].double()).square().sum()) for k in law)
    return math.sqrt(num / den)


def read_all(trajectory, checkpoint) -> dict[str, torch.Tensor]:
    with FileHandles() as handles:
        return {
            k: read_slab(handles, checkpoint, k, 0, e.numel).clone().view(e.shape)
            for k, e in checkpoint.entries.items()
            if k in trajectory.keys
        }


# ------------------------------------------------------------------------------------ reading


@NEEDS_DS
@pytest.mark.parametrize("run", [Z2 / "trl", Z2 / "openrlhf", Z3 / "trl"], ids=["zero2-trainer", "zero2-openrlhf", "zero3-trainer"])
def test_masters_equal_deepspeeds_own_consolidation(run: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trajectory = load_dense_trajectory(run)
    assert reader_of(trajectory).name == "deepspeed" and trajectory.step_numbers == [1, 2, 3, 4, 5, 6]
    assert trajectory.precision_note is None
    for checkpoint in (trajectory.checkpoints[0], trajectory.latest):
        tag = run / (f"checkpoint-{checkpoint.step}" if run.name == "trl" else "_actor") / f"global_step{checkpoint.step}"
        want = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        got = read_all(trajectory, checkpoint)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == torch.float32 and trajectory.output_dtype(key) == torch.bfloat16
            torch.testing.assert_close(got[key], value.detach().float(), rtol=0, atol=0)
    law = truth(run.parent, 6)
    torch.testing.assert_close(read_all(trajectory, trajectory.latest), law, rtol=1e-6, atol=1e-7)


def test_deepspeed_states_take_precedence_and_lora_runs_stay_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    import nextoffline.io.torch_zip as torch_zip

    def no_data(*args: object) -> None:
        raise AssertionError("loading a trajectory must not read tensor data")

    monkeypatch.setattr(torch_zip, "_read_with", no_data)  # header-only: pickles and zip directories
    trainer = load_dense_trajectory(Z2 / "trl", base=Z2 / "base")
    assert trainer.layout == "hf-trainer-deepspeed"  # not the bf16 model.safetensors beside it
    assert trainer.reference.folder == Z2 / "base" and trainer.model_files_dir == Z2 / "trl" / "checkpoint-6"
    assert load_dense_trajectory(Z2 / "openrlhf").layout == "openrlhf-deepspeed"
    for lora in ("trl_zero2_tiny", "trl_zero3_tiny", "openrlhf_zero3_tiny", "openrlhf_lora_tiny"):
        assert not is_dense_source(FIXTURES / lora), lora


# --------------------------------------------------------------------------- extrapolation


def _bf16_only(run: Path, dest: Path) -> Path:
    """The run without its optimizer states (the fp32 masters): what a weights-only save leaves."""
    shutil.copytree(run, dest)
    for path in dest.rglob("*_optim_states.pt"):
        path.unlink()
    return dest


def test_masters_extrapolate_the_law_where_bf16_weights_cannot(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = Z2 / "trl"
    before = tree_hashes(run)
    law, latest = truth(Z2, TARGET), load_file(run / "checkpoint-6" / "model.safetensors")
    code, output = run_cli("extrapolate", run, "--to-step", TARGET, "--out", tmp_path / "masters", "--device", "cpu", "--next-budget", 0)
    assert code == 0, output
    assert "auto selected power" in output and "warning" not in output
    got = load_file(tmp_path / "masters" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in got.values()) and got.keys() == latest.keys()
    masters_ratio = ratio(got, latest, law)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "masters")
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
    assert (tmp_path / "masters" / "tokenizer.json").is_file()

    bf16_run = _bf16_only(run, tmp_path / "bf16_run")
    code, output = run_cli("extrapolate", bf16_run, "--to-step", TARGET, "--out", tmp_path / "bf16", "--device", "cpu", "--next-budget", 0)
    assert code == 0, output
    assert "bit-identical between consecutive checkpoints" in output and "fp32 master weights were looked for" in output
    assert "_optim_states.pt" in output
    bf16_ratio = ratio(load_file(tmp_path / "bf16" / "model.safetensors"), latest, law)
    print(f"distance to the law relative to stopping: fp32 masters {masters_ratio:.3f}, bf16 weights only {bf16_ratio:.3f}")
    assert masters_ratio < 0.35 and masters_ratio < 0.5 * bf16_ratio, (masters_ratio, bf16_ratio)
    assert tree_hashes(run) == before


def test_openrlhf_keeps_few_deepspeed_checkpoints_then_warns_where_masters_were_looked_for(tmp_path: Path) -> None:
    run = tmp_path / "openrlhf"
    shutil.copytree(Z2 / "openrlhf", run)
    for step in (1, 2, 3):  # --ckpt.max_num 3 rotated them away; the _hf folders stay
        shutil.rmtree(run / "_actor" / f"global_step{step}")
    trajectory = load_dense_trajectory(run)
    assert trajectory.latest.folder == run / "global_step6_hf"
    assert "--ckpt.max_num" in (trajectory.precision_note or "") and "steps 1, 2, 3" in (trajectory.precision_note or "")
    code, output = run_cli("inspect", run, "--json")
    assert code == 0, output
    assert "--ckpt.max_num" in json.loads(output)["warning"]


# -------------------------------------------------------------------------------- resumable


def _deepspeed_load(jobs: list[tuple[Path, Path, int]]) -> list[dict]:
    """DeepSpeed's engine.load_checkpoint on each (load dir, expected weights, ZeRO stage), in one 2-process run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "DS_ACCELERATOR": "cpu"}
    script = FIXTURES / "make_deepspeed_fullparam_fixture.py"
    args = [os.pathsep.join(str(job[i]) for job in jobs) for i in range(3)]
    subprocess.run([sys.executable, str(script), "check", *args], check=True, timeout=600, cwd=REPO, env=env)
    return [json.loads(expected.with_suffix(".json").read_text()) for _d, expected, _s in jobs]


def _resumable(run: Path, out: Path) -> str:
    before = tree_hashes(run)
    code, output = run_cli("extrapolate", run, "--to-step", TARGET, "--out", out, "--device", "cpu", "--next-budget", 0, "--resumable")
    assert code == 0, output
    assert tree_hashes(run) == before
    return output


@NEEDS_DS
def test_resumable_trainer_checkpoint_rewrites_masters_module_and_safetensors(tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "out"
    output = _resumable(Z2 / "trl", out)
    copy = out / "resume" / "checkpoint-6"
    assert f"resume_from_checkpoint='{copy}'" in output
    masters = get_fp32_state_dict_from_zero_checkpoint(str(copy), tag="global_step6")
    law = truth(Z2, TARGET)
    assert ratio(masters, truth(Z2, 6), law) < 1e-3  # the fp32 masters carry the extrapolation exactly
    written, model = load_file(copy / "model.safetensors"), load_file(out / "model.safetensors")
    assert written.keys() == model.keys() and all(torch.equal(written[k], v) for k, v in model.items())
    module = torch.load(copy / "global_step6" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(module[k], masters[k].to(torch.bfloat16)) for k in masters)
    for path in (copy / "global_step6").iterdir():
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, path  # checksums of the rewritten records updated
    for name in ("rng_state_0.pth", "trainer_state.json", "latest", "training_args.bin"):
        assert (copy / name).read_bytes() == (Z2 / "trl" / "checkpoint-6" / name).read_bytes()


@NEEDS_DS
def test_deepspeed_resumes_with_the_extrapolated_masters_and_module(tmp_path: Path) -> None:
    """OpenRLHF ZeRO-2 and HF Trainer ZeRO-3: DeepSpeed's own load_checkpoint finds the extrapolated weights in the
    fp32 masters and the bf16 module (the input checkpoint holds the step-6 law, far from them)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output = _resumable(Z2 / "openrlhf", tmp_path / "z2")
    assert f"--ckpt.path {tmp_path / 'z2'}/resume --ckpt.load_enable" in output
    assert (tmp_path / "z2" / "resume" / "_actor" / "latest").read_text() == "global_step6"
    _resumable(Z3 / "trl", tmp_path / "z3")
    copy3 = tmp_path / "z3" / "resume" / "checkpoint-6"
    written, model = load_file(copy3 / "model.safetensors"), load_file(tmp_path / "z3" / "model.safetensors")
    assert written.keys() == model.keys() and all(torch.equal(written[k], v) for k, v in model.items())
    jobs = []
    for name, load_dir, stage in ((tmp_path / "z2", tmp_path / "z2" / "resume" / "_actor", 2), (tmp_path / "z3", copy3, 3)):
        masters = get_fp32_state_dict_from_zero_checkpoint(str(load_dir), tag="global_step6")
        expected = {k: v.detach().float().contiguous() for k, v in masters.items()}
        run = Z2 if stage == 2 else Z3
        assert ratio(expected, truth(run, 6), truth(run, TARGET)) < 1e-3, stage
        before = truth(run, 6)
        assert max(float((before[k] - expected[k]).abs().max()) for k in expected) > 1e-3
        save_file(expected, name / "expected.safetensors")
        jobs.append((load_dir, name / "expected.safetensors", stage))
    for resumed in _deepspeed_load(jobs):
        assert resumed == {**resumed, "keys": True, "master_max_diff": 0.0, "module_max_diff": 0.0, "step": 6}, resumed


def test_damaged_or_missing_rank_file_is_one_line_naming_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(Z2 / "openrlhf", run, ignore=shutil.ignore_patterns("*_hf"))
    damaged = run / "_actor" / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    code, output = run_cli("inspect", run)
    assert code != 0 and str(damaged) in output and "Traceback" not in output and len(output.strip().splitlines()) == 1
    damaged.unlink()
    code, output = run_cli("inspect", run)
    assert code != 0 and "ranks [1] are missing" in output and "global_step3" in output and "Traceback" not in output


def test_resumable_refuses_a_weight_file_it_does_not_rewrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(Z2 / "trl", run)
    torch.save({"module": {}}, run / "checkpoint-6" / "global_step6" / "mp_rank_01_model_states.pt")
    code, output = run_cli("extrapolate", run, "--coef", 1, "--method", "linear", "--out", tmp_path / "o", "--resumable")
    assert code != 0 and "mp_rank_01_model_states.pt" in output and "tensor-parallel" in output and "Traceback" not in output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("run", [Z2 / "openrlhf", Z3 / "trl"], ids=["zero2-openrlhf", "zero3-trl"])
def test_torchrun_two_processes_write_byte_identical_masters_and_model(tmp_path: Path, run: Path) -> None:
    """Masters split over rank partitions under torchrun: the model folder and the --resumable copy's
    rewritten masters, module and safetensors are byte-identical to the single-process run's."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["extrapolate", str(run), "--to-step", str(TARGET), "--method", "power", "--device", "cpu", "--chunk-mb", "1", "--resumable"]
    code, output = run_cli(*args, "--out", single)
    assert code == 0, output
    proc = torchrun_cli([*args, "--quiet", "--out", str(multi)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt"))
    assert any("optim_states" in p.name for p in files) and any(p.suffix == ".safetensors" for p in files)
    for name in files:
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
