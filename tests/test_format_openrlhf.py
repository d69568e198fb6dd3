"""OpenRLHF layout: detection, DeepSpeed ZeRO-2 states, and --resumable writing in place.

Fixture ``openrlhf_lora_tiny`` (``fixtures/make_trainer_fixtures.py``): a real DeepSpeed 0.19.5
ZeRO-2 bf16 run on 2 CPU ranks, ``global_stepN_hf/`` every 2 steps, the last 3 ``_actor``
checkpoints kept (``--ckpt.max_num 3``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextoffline.errors import AdapterFileError, FormatDetectionError, IncompatibleCheckpointsError
from nextoffline.formats import FORMATS
from nextoffline.formats.openrlhf import OpenRLHFFormat, load_lora_state, load_master_lora_state
from nextoffline.io.torch_zip import read_structure, read_tensors
from tests.conftest import FIXTURES, REPO, tree_hashes

RUN = FIXTURES / "openrlhf_lora_tiny"
FMT = OpenRLHFFormat()
OPTIM = [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]


def adapter_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((RUN / "global_step8_hf" / "adapter_config.json").read_text())
    return folder


def resumable(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    out = tmp_path / "resume"
    out.mkdir()
    FMT.write_resumable(FMT.list_steps(RUN)[-1], adapter_folder(tmp_path / "adapter", tensors), out)
    return out


def moments(path: Path) -> list[torch.Tensor]:
    """Adam moments and step of one ZeRO optimizer states file."""
    state = read_structure(path)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    refs = [ref for group in state.values() for ref in group.values()]
    return read_tensors(path, refs)


def test_registered_and_probes_only_openrlhf_layouts(tmp_path: Path) -> None:
    assert FORMATS["openrlhf"].name == "openrlhf"
    assert FMT.probe(RUN)
    for other in (FIXTURES / "verl_lora_tiny", FIXTURES / "verl09_lora_tiny", FIXTURES / "synthetic_linear", tmp_path):
        assert not FMT.probe(other), other


def test_list_steps_reads_hf_folders_and_pairs_deepspeed_tags() -> None:
    refs = FMT.list_steps(RUN)
    assert [r.step for r in refs] == [2, 4, 6, 8]
    assert all(r.weights_file == RUN / f"global_step{r.step}_hf" / "adapter_model.safetensors" for r in refs)
    assert refs[0].checkpoint_dir == RUN / "global_step2_hf"  # rotated out of _actor/ by --ckpt.max_num 3
    assert [r.checkpoint_dir for r in refs[1:]] == [RUN / "_actor" / f"global_step{s}" for s in (4, 6, 8)]
    assert FMT.adapter_config(refs[-1])["lora_alpha"] == 8


def test_deepspeed_states_hold_the_adapter() -> None:
    tag = RUN / "_actor" / "global_step8"
    hf = load_file(RUN / "global_step8_hf" / "adapter_model.safetensors")
    module = load_lora_state(tag / "mp_rank_00_model_states.pt")
    master = load_master_lora_state(tag)
    assert hf.keys() == module.keys() == master.keys() and len(hf) == 28
    for key in hf:
        assert module[key].dtype == torch.bfloat16 and master[key].dtype == torch.float32
        assert torch.equal(module[key], hf[key])
        assert torch.equal(master[key].to(torch.bfloat16), module[key]), key  # the bf16 copy is the rounded master


def test_resumable_with_same_weights_is_byte_identical(tmp_path: Path) -> None:
    before = tree_hashes(RUN)
    out = resumable(tmp_path, load_file(RUN / "global_step8_hf" / "adapter_model.safetensors"))
    written = tree_hashes(out)
    expected = {k: v for k, v in before.items() if k.startswith(("_actor/global_step8/", "global_step8_hf/"))}
    expected |= {"_actor/latest": before["_actor/latest"], "_actor/zero_to_fp32.py": before["_actor/zero_to_fp32.py"]}
    assert written == expected
    assert tree_hashes(RUN) == before


def test_resumable_replaces_lora_in_module_and_fp32_masters(tmp_path: Path) -> None:
    before = tree_hashes(RUN)
    tag = RUN / "_actor" / "global_step8"
    old = load_file(RUN / "global_step8_hf" / "adapter_model.safetensors")
    new = {k: (v.float() + 0.25).to(v.dtype) if ".v_proj." in k or "layers.1.mlp.up_proj.lora_B" in k else v for k, v in old.items()}
    out = resumable(tmp_path, new)
    out_tag = out / "_actor" / "global_step8"
    assert tree_hashes(RUN) == before
    assert (out / "_actor" / "latest").read_text() == "global_step8"
    module, master = load_lora_state(out_tag / "mp_rank_00_model_states.pt"), load_master_lora_state(out_tag)
    old_master = load_master_lora_state(tag)
    for key in old:
        assert torch.equal(module[key], new[key])
        if torch.equal(new[key], old[key]):
            assert torch.equal(master[key], old_master[key]), key  # full fp32 precision kept
        else:
            assert torch.equal(master[key], new[key].float()), key
    src_module = read_structure(tag / "mp_rank_00_model_states.pt")["module"]
    out_module = read_structure(out_tag / "mp_rank_00_model_states.pt")["module"]
    for key, ref in src_module.items():
        if ".lora_" not in key:
            (written,) = read_tensors(out_tag / "mp_rank_00_model_states.pt", [out_module[key]])
            (original,) = read_tensors(tag / "mp_rank_00_model_states.pt", [ref])
            assert torch.equal(written, original), key
    for name in OPTIM:
        assert all(torch.equal(a, b) for a, b in zip(moments(out_tag / name), moments(tag / name)))  # Adam state untouched
    for name in ["mp_rank_00_model_states.pt", *OPTIM]:
        with zipfile.ZipFile(out_tag / name) as archive, zipfile.ZipFile(tag / name) as original:
            assert archive.testzip() is None
            pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            assert archive.read(pickle_name) == original.read(pickle_name)
    changed = {k for k, v in tree_hashes(out).items() if before[k] != v}
    assert changed == {
        "_actor/global_step8/mp_rank_00_model_states.pt",
        *(f"_actor/global_step8/{n}" for n in OPTIM),
        "global_step8_hf/adapter_model.safetensors",
    }
    hf = load_file(out / "global_step8_hf" / "adapter_model.safetensors")
    assert all(torch.equal(hf[k], new[k]) and hf[k].dtype == torch.bfloat16 for k in new)


def test_resumable_command_and_notes(tmp_path: Path) -> None:
    out = tmp_path / "resume"
    out.mkdir()
    same = load_file(RUN / "global_step8_hf" / "adapter_model.safetensors")
    info = FMT.write_resumable(FMT.list_steps(RUN)[-1], adapter_folder(tmp_path / "adapter", same), out)
    assert info.checkpoint_dir == out / "_actor" / "global_step8"
    assert info.command.endswith(f"--ckpt.path {out} --ckpt.load_enable")
    assert any("continues at step 8" in note for note in info.notes)


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    shutil.rmtree(run / "_actor" / "global_step8")
    latest = FMT.list_steps(run)[-1]
    wrong = {
        k: torch.zeros(5, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 5) for k, v in load_file(latest.weights_file).items()
    }
    (tmp_path / "out").mkdir()
    with pytest.raises(AdapterFileError, match="no DeepSpeed checkpoint for step 8"):
        FMT.write_resumable(latest, adapter_folder(tmp_path / "adapter", wrong), tmp_path / "out")
    with pytest.raises(IncompatibleCheckpointsError, match="rank"):
        FMT.write_resumable(FMT.list_steps(RUN)[-1], tmp_path / "adapter", tmp_path / "out")
    for hf in run.glob("global_step*_hf"):
        shutil.rmtree(hf)
    with pytest.raises(FormatDetectionError, match="--ckpt.save_hf"):
        FMT.list_steps(run)


def test_run_loads_as_a_trajectory() -> None:
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(RUN)
    assert trajectory.format_name == "openrlhf" and trajectory.step_numbers == [2, 4, 6, 8]
    assert set(trajectory.dtypes.values()) == {"bfloat16"}


# --------------------------------------------------------------------------- DeepSpeed's resume path on CPU


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_resume_loads_the_new_weights(tmp_path: Path) -> None:
    old = load_file(RUN / "global_step8_hf" / "adapter_model.safetensors")
    new = {k: (v.float() + 0.5).to(torch.bfloat16) for k, v in old.items()}  # |v| << 1: every bf16 value changes
    out = resumable(tmp_path, new)
    expected = tmp_path / "expected.safetensors"
    save_file({k: v.float() for k, v in new.items()}, str(expected))  # every value changed, so the masters are the new values
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "DS_ACCELERATOR": "cpu"}
    script = FIXTURES / "make_trainer_fixtures.py"
    subprocess.run([sys.executable, str(script), "check-openrlhf", str(out), str(expected)], check=True, timeout=600, cwd=REPO, env=env)
    assert json.loads(expected.with_suffix(".json").read_text()) == {"module": True, "master": True, "step": 8}
