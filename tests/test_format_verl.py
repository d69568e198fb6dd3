"""verl layout: detection, DTensor shard assembly, and --resumable writing in place.

Fixtures (``fixtures/make_trainer_fixtures.py``): ``verl_lora_tiny`` (verl <= 0.7, 2 ranks,
``lora_adapter/``) and ``verl09_lora_tiny`` (verl 0.9, 3 ranks: uneven, empty and dim-1 shards).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor
from safetensors.torch import load_file, save_file

from nextoffline.errors import AdapterConfigError, AdapterFileError, IncompatibleCheckpointsError
from nextoffline.formats import FORMATS
from nextoffline.formats.lora_keys import peft_key
from nextoffline.formats.verl import VerlFormat, load_lora_state
from tests.conftest import FIXTURES, REPO, tree_hashes

LEGACY = FIXTURES / "verl_lora_tiny"
V09 = FIXTURES / "verl09_lora_tiny"
FMT = VerlFormat()


def dtensor_oracle(actor: Path, world: int) -> dict[str, torch.Tensor]:
    """Full LoRA tensors assembled with torch's own DTensor objects (concatenate local shards)."""
    shards = [torch.load(actor / f"model_world_size_{world}_rank_{r}.pt", weights_only=True) for r in range(world)]
    full = {}
    for key, value in shards[0].items():
        if peft_key(key) is None:
            continue
        (placement,) = value.placements
        full[peft_key(key)] = torch.cat([s[key]._local_tensor for s in shards], dim=placement.dim)
    return full


def adapter_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return folder


def test_registered_and_probes_only_verl_layouts(tmp_path: Path) -> None:
    assert FORMATS["verl"].name == "verl"
    assert FMT.probe(LEGACY) and FMT.probe(V09)
    for other in (FIXTURES / "openrlhf_lora_tiny", FIXTURES / "synthetic_linear", tmp_path):
        assert not FMT.probe(other), other
    trl = tmp_path / "checkpoint-2"
    trl.mkdir()
    (trl / "adapter_config.json").write_text("{}")
    assert not FMT.probe(tmp_path)


def test_list_steps_legacy_reads_lora_adapter() -> None:
    refs = FMT.list_steps(LEGACY)
    assert [r.step for r in refs] == [2, 4, 6, 8]
    assert all(r.weights_file == r.checkpoint_dir / "actor" / "lora_adapter" / "adapter_model.safetensors" for r in refs)
    assert FMT.adapter_config(refs[-1])["r"] == 4


def test_list_steps_v09_reads_model_shards() -> None:
    refs = FMT.list_steps(V09)
    assert [r.step for r in refs] == [2, 4, 6, 8]
    assert all(r.weights_file.name == "model_world_size_3_rank_0.pt" and r.adapter_dir.name == "actor" for r in refs)
    config = FMT.adapter_config(refs[-1])
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize(("root", "world"), [(LEGACY, 2), (V09, 3)])
def test_shard_assembly_matches_dtensor_oracle(root: Path, world: int) -> None:
    actor = root / "global_step_8" / "actor"
    assembled = load_lora_state(actor / f"model_world_size_{world}_rank_0.pt")
    oracle = dtensor_oracle(actor, world)
    assert assembled.keys() == oracle.keys() and len(assembled) == 28
    for key, value in oracle.items():
        assert assembled[key].dtype == torch.float32 and torch.equal(assembled[key], value), key


def test_shards_equal_the_legacy_lora_adapter() -> None:
    actor = LEGACY / "global_step_8" / "actor"
    adapter = load_file(actor / "lora_adapter" / "adapter_model.safetensors")
    assembled = load_lora_state(actor / "model_world_size_2_rank_0.pt")
    assert adapter.keys() == assembled.keys()
    assert all(torch.equal(adapter[k], assembled[k]) for k in adapter)


@pytest.mark.parametrize("root", [LEGACY, V09])
def test_resumable_with_same_weights_is_byte_identical(root: Path, tmp_path: Path) -> None:
    before = tree_hashes(root)
    latest = FMT.list_steps(root)[-1]
    same = load_lora_state(sorted((latest.checkpoint_dir / "actor").glob("model_world_size_*_rank_0.pt"))[0])
    out = tmp_path / "resume"
    out.mkdir()
    info = FMT.write_resumable(latest, adapter_folder(tmp_path / "adapter", same), out)
    assert info.checkpoint_dir == out / "global_step_8"
    assert f"trainer.resume_from_path={out / 'global_step_8'}" in info.command
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "8"
    written = tree_hashes(out / "global_step_8")
    assert written == {k.removeprefix("global_step_8/"): v for k, v in before.items() if k.startswith("global_step_8/")}
    assert tree_hashes(root) == before


@pytest.mark.parametrize(("root", "world"), [(LEGACY, 2), (V09, 3)])
def test_resumable_replaces_exactly_the_lora_tensors(root: Path, world: int, tmp_path: Path) -> None:
    before = tree_hashes(root)
    latest = FMT.list_steps(root)[-1]
    actor = latest.checkpoint_dir / "actor"
    old = load_lora_state(actor / f"model_world_size_{world}_rank_0.pt")
    new = {k: v + torch.randn_like(v) if ".q_proj." in k or "down_proj.lora_A" in k else v for k, v in old.items()}
    out = tmp_path / "resume"
    out.mkdir()
    FMT.write_resumable(latest, adapter_folder(tmp_path / "adapter", new), out)
    out_actor = out / "global_step_8" / "actor"
    assert tree_hashes(root) == before
    assembled = dtensor_oracle(out_actor, world)
    assert all(torch.equal(assembled[k], new[k]) for k in new)
    for rank in range(world):
        name = f"model_world_size_{world}_rank_{rank}.pt"
        src, dst = torch.load(actor / name, weights_only=True), torch.load(out_actor / name, weights_only=True)
        assert list(src) == list(dst)
        for key in src:
            assert dst[key].placements == src[key].placements and dst[key].dtype == src[key].dtype
            if peft_key(key) is None or torch.equal(new[peft_key(key)], old[peft_key(key)]):
                assert torch.equal(dst[key]._local_tensor, src[key]._local_tensor), key
        with zipfile.ZipFile(out_actor / name) as archive, zipfile.ZipFile(actor / name) as original:
            assert archive.testzip() is None  # CRCs updated
            pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            assert archive.read(pickle_name) == original.read(pickle_name)  # structure untouched
    written = tree_hashes(out / "global_step_8")
    changed = {k for k, v in written.items() if before["global_step_8/" + k] != v}
    expected = {f"actor/model_world_size_{world}_rank_{r}.pt" for r in range(world)}
    if root == LEGACY:
        expected.add("actor/lora_adapter/adapter_model.safetensors")
        legacy = load_file(out_actor / "lora_adapter" / "adapter_model.safetensors")
        assert all(torch.equal(legacy[k], new[k]) and legacy[k].dtype == torch.float32 for k in new)
    assert changed == expected


def test_save_lora_only_shards(tmp_path: Path) -> None:
    """verl 0.9 ``checkpoint.save_lora_only=True``: the shards hold only the LoRA DTensors."""
    run = tmp_path / "run"
    shutil.copytree(V09 / "global_step_8", run / "global_step_8")
    actor = run / "global_step_8" / "actor"
    for rank in range(3):
        shard = actor / f"model_world_size_3_rank_{rank}.pt"
        torch.save({k: v for k, v in torch.load(shard, weights_only=True).items() if "lora_" in k}, shard)
    (latest,) = FMT.list_steps(run)
    old = load_lora_state(latest.weights_file)
    assert len(old) == 28 and all(torch.equal(old[k], v) for k, v in dtensor_oracle(V09 / "global_step_8" / "actor", 3).items())
    new = {k: v - 1.0 for k, v in old.items()}
    out = tmp_path / "resume"
    out.mkdir()
    FMT.write_resumable(latest, adapter_folder(tmp_path / "adapter", new), out)
    assembled = dtensor_oracle(out / "global_step_8" / "actor", 3)
    assert assembled.keys() == new.keys() and all(torch.equal(assembled[k], new[k]) for k in new)


def test_resumable_rejects_another_rank(tmp_path: Path) -> None:
    latest = FMT.list_steps(LEGACY)[-1]
    wrong = {
        k: torch.zeros(5, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 5) for k, v in load_file(latest.weights_file).items()
    }
    out = tmp_path / "resume"
    out.mkdir()
    with pytest.raises(IncompatibleCheckpointsError, match="rank"):
        FMT.write_resumable(latest, adapter_folder(tmp_path / "adapter", wrong), out)


def test_broken_layouts_raise_one_line_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(V09 / "global_step_8", run / "global_step_8")
    (run / "global_step_8" / "actor" / "model_world_size_3_rank_1.pt").unlink()
    with pytest.raises(AdapterFileError, match="ranks \\[1\\] are missing"):
        FMT.list_steps(run)
    shard = Path("global_step_8") / "actor" / "model_world_size_3_rank_1.pt"
    shutil.copyfile(V09 / shard, run / shard)
    (run / "global_step_8" / "actor" / "lora_train_meta.json").unlink()
    with pytest.raises(AdapterConfigError, match="verl.model_merger"):
        FMT.adapter_config(FMT.list_steps(run)[0])


def test_legacy_run_loads_as_a_trajectory() -> None:
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(LEGACY)
    assert trajectory.format_name == "verl" and trajectory.step_numbers == [2, 4, 6, 8]
    assert len(trajectory.modules) == 14 and set(trajectory.dtypes.values()) == {"float32"}


# --------------------------------------------------------------------------- verl's resume path on CPU


@pytest.mark.slow
def test_fsdp2_resume_loads_the_new_weights(tmp_path: Path) -> None:
    latest = FMT.list_steps(V09)[-1]
    old = load_lora_state(latest.checkpoint_dir / "actor" / "model_world_size_3_rank_0.pt")
    new = {k: v * 1.5 + 0.01 for k, v in old.items()}
    out = tmp_path / "resume"
    out.mkdir()
    FMT.write_resumable(latest, adapter_folder(tmp_path / "adapter", new), out)
    expected = tmp_path / "expected.safetensors"
    save_file(new, str(expected))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = FIXTURES / "make_trainer_fixtures.py"
    subprocess.run(
        [sys.executable, str(script), "check-verl", str(out / "global_step_8" / "actor"), str(expected), "3"],
        check=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert json.loads(expected.with_suffix(".json").read_text()) == {"ok": True, "steps": [8]}
