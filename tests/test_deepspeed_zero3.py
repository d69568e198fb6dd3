"""DeepSpeed ZeRO-3 (and TRL + ZeRO-2) in the TRL and OpenRLHF layouts: --resumable rewrites every place DeepSpeed loads LoRA from.

Fixtures ``trl_zero3_tiny``, ``openrlhf_zero3_tiny`` and ``trl_zero2_tiny`` (``fixtures/make_deepspeed_fixtures.py``):
a real DeepSpeed ZeRO-3 bf16 engine on 2 CPU ranks (gloo), optimizer built by DeepSpeed from its
config (``torch_adam``), saved by ``engine.save_checkpoint`` every 2 steps. The resume tests run
DeepSpeed's own ``engine.load_checkpoint`` (the call of OpenRLHF's ``load_ckpt`` and of
transformers' ``deepspeed_load_checkpoint``) on the written checkpoint, in 2 processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextoffline.formats import detect_format
from nextoffline.formats.openrlhf import OpenRLHFFormat, load_master_lora_state
from nextoffline.io.torch_zip import read_structure, read_tensors
from tests.conftest import FIXTURES, REPO, extrapolate_resumable

TRL = FIXTURES / "trl_zero3_tiny"
OPENRLHF = FIXTURES / "openrlhf_zero3_tiny"
NEEDS_DS = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _deepspeed_load(pairs: list[tuple[Path, Path]], stage: int = 3) -> list[dict]:
    """DeepSpeed's engine.load_checkpoint on each (load dir, expected adapter) pair, in one 2-process run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "DS_ACCELERATOR": "cpu"}
    script = FIXTURES / "make_deepspeed_fixtures.py"
    dirs, wanted = os.pathsep.join(str(d) for d, _e in pairs), os.pathsep.join(str(e) for _d, e in pairs)
    subprocess.run([sys.executable, str(script), "check", dirs, wanted, str(stage)], check=True, timeout=600, cwd=REPO, env=env)
    return [json.loads(e.with_suffix(".json").read_text()) for _d, e in pairs]


def _changed(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(new[k], old[k]) for k in old)


@pytest.mark.parametrize(
    ("tag", "adapter"),
    [
        (TRL / "checkpoint-8" / "global_step8", TRL / "checkpoint-8" / "adapter_model.safetensors"),
        (OPENRLHF / "_actor" / "global_step8", OPENRLHF / "global_step8_hf" / "adapter_model.safetensors"),
    ],
)
def test_zero3_fp32_partitions_hold_the_adapter(tag: Path, adapter: Path) -> None:
    hf, master = load_file(adapter), load_master_lora_state(tag)
    assert master.keys() == hf.keys() and len(hf) == 28
    for key in hf:
        assert master[key].dtype == torch.float32 and torch.equal(master[key].to(torch.bfloat16), hf[key]), key


def test_zero3_runs_are_detected() -> None:
    assert detect_format(TRL).name == "trl" and detect_format(OPENRLHF).name == "openrlhf"
    refs = OpenRLHFFormat().list_steps(OPENRLHF)
    assert [r.step for r in refs] == [2, 4, 6, 8]
    assert [r.checkpoint_dir for r in refs[1:]] == [OPENRLHF / "_actor" / f"global_step{s}" for s in (4, 6, 8)]


def test_zero3_resumable_rewrites_only_the_fp32_lora_partitions(tmp_path: Path) -> None:
    extrapolate_resumable(OPENRLHF, tmp_path / "out")
    source, written = OPENRLHF / "_actor" / "global_step8", tmp_path / "out" / "resume" / "_actor" / "global_step8"
    new = load_file(tmp_path / "out" / "adapter_model.safetensors")
    master = load_master_lora_state(written)
    assert all(torch.equal(master[k].to(torch.bfloat16), new[k]) for k in new)
    assert _changed(new, load_file(OPENRLHF / "global_step8_hf" / "adapter_model.safetensors"))
    for rank in range(2):  # module placeholders and Adam moments: byte for byte
        name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        assert (written / name).read_bytes() == (source / name).read_bytes()
        optim = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        state = read_structure(source / optim)["optimizer_state_dict"]["optimizer_state_dict"]["state"]
        refs = [ref for group in state.values() for ref in group.values() if hasattr(ref, "storage")]
        out_state = read_structure(written / optim)["optimizer_state_dict"]["optimizer_state_dict"]["state"]
        out_refs = [ref for group in out_state.values() for ref in group.values() if hasattr(ref, "storage")]
        assert all(torch.equal(a, b) for a, b in zip(read_tensors(written / optim, out_refs), read_tensors(source / optim, refs)))
    assert (tmp_path / "out" / "resume" / "_actor" / "latest").read_text() == "global_step8"


@pytest.mark.slow
@NEEDS_DS
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resumes_with_the_extrapolation(tmp_path: Path, stage: int) -> None:
    """TRL (ZeRO-2 and -3) and OpenRLHF (ZeRO-3): what the trainer's engine.load_checkpoint loads is the extrapolation."""
    runs = {"trl": FIXTURES / f"trl_zero{stage}_tiny"} | ({"openrlhf": OPENRLHF} if stage == 3 else {})
    pairs, olds = [], []
    for name, run in runs.items():
        stdout = extrapolate_resumable(run, tmp_path / name)
        expected = tmp_path / name / "adapter_model.safetensors"
        if name == "trl":
            checkpoint = tmp_path / name / "resume" / "checkpoint-8"
            assert f"resume_from_checkpoint={str(checkpoint)!r}" in stdout
            written = load_file(checkpoint / "adapter_model.safetensors")
            assert all(torch.equal(written[k], v) for k, v in load_file(expected).items())
            pairs.append((checkpoint, expected))  # transformers' deepspeed_load_checkpoint(model, checkpoint)
            olds.append(load_file(run / "checkpoint-8" / "adapter_model.safetensors"))
        else:
            assert "--ckpt.load_enable" in stdout
            pairs.append((tmp_path / name / "resume" / "_actor", expected))  # OpenRLHF's load_ckpt(ckpt_path/_actor)
            olds.append(load_file(run / "global_step8_hf" / "adapter_model.safetensors"))
    results = _deepspeed_load(pairs, stage)
    for (name, _run), result, (_dir, expected), old in zip(runs.items(), results, pairs, olds):
        client_step = 8 if name == "openrlhf" else None
        assert result == {"module": True, "master": True, "step": 8, "client_step": client_step}, name
        assert _changed(load_file(expected), old), name


@NEEDS_DS
@pytest.mark.parametrize("run", [TRL / "checkpoint-8", OPENRLHF / "_actor", FIXTURES / "trl_zero3_w3_tiny" / "checkpoint-8"])
def test_zero3_masters_match_deepspeeds_own_recovery(run: Path) -> None:
    """DeepSpeed's zero_to_fp32 (an independent reader of the same partitions) gives the same fp32 LoRA."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nextoffline.formats.lora_keys import peft_key

    theirs = {peft_key(k): v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(run), tag="global_step8").items() if peft_key(k)}
    ours = load_master_lora_state(run / "global_step8")
    assert ours.keys() == theirs.keys() and len(ours) == 28
    assert all(torch.equal(ours[k], theirs[k].float()) for k in ours)


@NEEDS_DS
def test_zero3_padded_partitions_rewritten_as_deepspeed_reads_them(tmp_path: Path) -> None:
    """3 ranks: every LoRA tensor is split unevenly (zero-padded last partition); DeepSpeed's reader sees the new values."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nextoffline.formats.lora_keys import peft_key

    run = FIXTURES / "trl_zero3_w3_tiny"
    extrapolate_resumable(run, tmp_path / "out")
    checkpoint = tmp_path / "out" / "resume" / "checkpoint-8"
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="global_step8")
    masters = {peft_key(k): v for k, v in state.items() if peft_key(k)}
    new = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert masters.keys() == new.keys() and all(torch.equal(masters[k].to(new[k].dtype), new[k]) for k in new)
    assert _changed(new, load_file(run / "checkpoint-8" / "adapter_model.safetensors"))
