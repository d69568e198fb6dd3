"""No silent loss: every weight file a trainer loads on resume is rewritten, or --resumable refuses.

Each row of issue 12's table is built here as the trainer lays it out (file names and folders of
DeepSpeed ZeRO-3, tensor parallel, accelerate FSDP, Megatron) next to a readable adapter
trajectory. ``extrapolate --resumable`` must either write a checkpoint the trainer's own loader
resumes with the new LoRA (those layouts have their own tests) or fail with one ``error:`` line
naming the file and the layout, exit 1 and write nothing. None may exit 0 with the file unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nextoffline import errors as E
from nextoffline.cli import main
from nextoffline.formats import FORMATS
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files, describe_weight_file
from tests.conftest import FIXTURES, tree_hashes
from tests.test_format_trl import make_trl_run

OPENRLHF = FIXTURES / "openrlhf_lora_tiny"
VERL = FIXTURES / "verl_lora_tiny"


def _touch_pt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {}}, path)


def _extrapolate(run: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["extrapolate", str(run), "--coef", "1", "--method", "linear", "--out", str(out), "-q", *extra])
    return result.exit_code, result.stdout, result.stderr


def _refused(run: Path, tmp_path: Path, *fragments: str) -> str:
    """Run --resumable; assert the clean one-line refusal and that nothing was written or changed."""
    before = tree_hashes(run)
    code, _stdout, stderr = _extrapolate(run, tmp_path / "out", "--resumable")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "out").exists()
    assert tree_hashes(run) == before
    return lines[0]


# --------------------------------------------------------------------------- TRL / transformers.Trainer


def test_trl_zero3_tensor_parallel_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "trl_zero3_tiny", run)
    tag = run / "checkpoint-8" / "global_step8"
    for rank in range(2):
        shutil.copyfile(tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", tag / f"zero_pp_rank_{rank}_mp_rank_01_model_states.pt")
    line = _refused(run, tmp_path, "zero_pp_rank_0_mp_rank_01_model_states.pt", "tensor-parallel rank > 0", "TRL + DeepSpeed ZeRO-3")
    assert "(and 1 more)" in line


def test_trl_tensor_parallel_rank_is_refused(tmp_path: Path) -> None:
    run = make_trl_run(tmp_path / "run")
    tag = run / "checkpoint-8" / "global_step8"
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        _touch_pt(tag / name)
    _refused(run, tmp_path, "mp_rank_01_model_states.pt", "tensor-parallel rank > 0", "TRL + DeepSpeed ZeRO-1/2")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("pytorch_model_fsdp_0_rank1.bin", "LOCAL_STATE_DICT"),
        ("pytorch_model_fsdp_1/__0_0.distcp", "SHARDED_STATE_DICT"),
        ("model.safetensors", "full model weights"),
        ("other_adapter/adapter_model.safetensors", "PEFT adapter"),
        ("custom_weights.pt", "unknown weight file"),
    ],
)
def test_trl_unknown_weight_files_are_refused(tmp_path: Path, name: str, kind: str) -> None:
    run = make_trl_run(tmp_path / "run")
    _touch_pt(run / "checkpoint-8" / name)
    if name.startswith("pytorch_model_fsdp_1/"):  # a second model's DCP folder (model_index 1): not rewritten
        (run / "checkpoint-8" / "pytorch_model_fsdp_1" / ".metadata").write_bytes(b"meta")
        name = "pytorch_model_fsdp_1"
    _refused(run, tmp_path, f"checkpoint-8/{name}:", kind, "TRL / transformers.Trainer")


def test_trl_run_without_any_adapter_names_the_layout(tmp_path: Path) -> None:
    run = make_trl_run(tmp_path / "run")
    for step in (2, 4, 6, 8):
        ckpt = run / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (ckpt / name).unlink()
        _touch_pt(ckpt / "custom_weights.pt")  # no adapter, no full model: nothing nextoffline can read
    code, _stdout, stderr = _extrapolate(run, tmp_path / "out", "--resumable")
    assert code == 1 and "checkpoint-8: transformers.Trainer checkpoint without adapter_config.json" in stderr
    assert "custom_weights.pt (unknown weight file)" in stderr
    assert "no checkpoints found" not in stderr


def test_trl_plain_checkpoint_still_resumes(tmp_path: Path) -> None:
    run = make_trl_run(tmp_path / "run")
    code, stdout, stderr = _extrapolate(run, tmp_path / "out", "--resumable")
    assert code == 0, stderr
    assert "resume_from_checkpoint" in stdout


# --------------------------------------------------------------------------- OpenRLHF


def test_openrlhf_zero3_is_not_refused_for_a_missing_checkpoint(tmp_path: Path) -> None:
    """ZeRO-3 tags used to be unseen, so OpenRLHF said "no DeepSpeed checkpoint"; now they resume (tests/test_deepspeed_zero3.py)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "openrlhf_zero3_tiny", run)
    tag = run / "_actor" / "global_step8"
    shutil.copyfile(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", tag / "zero_pp_rank_0_mp_rank_01_model_states.pt")
    line = _refused(run, tmp_path, "zero_pp_rank_0_mp_rank_01_model_states.pt", "OpenRLHF DeepSpeed ZeRO-3")
    assert "no DeepSpeed checkpoint" not in line


def test_openrlhf_tensor_parallel_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(OPENRLHF, run)
    tag = run / "_actor" / "global_step8"
    shutil.copyfile(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    _refused(run, tmp_path, "mp_rank_01_model_states.pt", "tensor-parallel rank > 0", "OpenRLHF DeepSpeed")


# --------------------------------------------------------------------------- verl


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("actor/dist_ckpt/__0_0.distcp", "Megatron distributed checkpoint"),
        ("actor/model_world_size_2_rank_0.safetensors", "unknown weight file"),
        ("actor/model.safetensors", "full model weights"),
    ],
)
def test_verl_unknown_weight_files_are_refused(tmp_path: Path, name: str, kind: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    _touch_pt(run / "global_step_8" / name)
    shown = name.split("/__0_0")[0]
    _refused(run, tmp_path, f"global_step_8/{shown}:", kind, "verl FSDP")


def test_verl_declared_weightless_files_do_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    _touch_pt(run / "global_step_8" / "actor" / "huggingface" / "model.safetensors")  # save_contents hf_model: never loaded
    _touch_pt(run / "global_step_8" / "critic" / "model_world_size_2_rank_0.pt")  # the critic is not extrapolated
    code, stdout, stderr = _extrapolate(run, tmp_path / "out", "--resumable")
    assert code == 0, stderr
    assert "trainer.resume_from_path" in stdout


# --------------------------------------------------------------------------- the rule itself


def test_every_format_declares_its_resume_files() -> None:
    for fmt in FORMATS.values():
        assert callable(getattr(fmt, "resume_files", None)), fmt.name


def test_check_names_the_most_telling_file(tmp_path: Path) -> None:
    for name in ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt", "a.safetensors"):
        _touch_pt(tmp_path / name)
    declared = ResumeFiles(tmp_path, "test layout", frozenset({tmp_path / "a.safetensors"}))
    with pytest.raises(E.UnhandledCheckpointError, match=r"zero_pp_rank_0_mp_rank_00_model_states\.pt: DeepSpeed ZeRO-3.*\(and 1 more\)"):
        check_resume_files(declared)
    check_resume_files(ResumeFiles(tmp_path, "test layout", frozenset({tmp_path / "a.safetensors"}), ("*zero_pp_rank_*",)))
    assert describe_weight_file(tmp_path / "mp_rank_03_model_states.pt").endswith("tensor-parallel rank > 0")


def test_free_space_estimate_counts_lora_bytes_not_the_rank0_shard(tmp_path: Path) -> None:
    from nextoffline.output import _adapter_bytes
    from nextoffline.trajectory import load_trajectory

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "verl09_lora_tiny", run)
    shard = run / "global_step_8" / "actor" / "model_world_size_3_rank_0.pt"
    trajectory = load_trajectory(run)
    assert trajectory.latest.weights_file == shard
    estimate = _adapter_bytes(trajectory)
    code, _stdout, stderr = _extrapolate(run, tmp_path / "out")
    assert code == 0, stderr
    written = (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    assert written <= estimate <= written + 64 * 1024
    assert estimate - 64 * 1024 < shard.stat().st_size / 3  # the shard also holds rank 0's part of the base model


def test_writers_are_only_called_through_the_check() -> None:
    """Every caller goes through write_resumable_checked, so no writer can skip the refusal."""
    import nextoffline

    package = Path(nextoffline.__file__).parent
    callers = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ".write_resumable(" in line and "return fmt.write_resumable(" not in line
    ]
    assert callers == [], f"call formats.base.write_resumable_checked instead: {callers}"
