"""verl shards pickled by an older torch (2.7.1), read and rewritten with the torch CI runs.

``fixtures/verl_torch27_lora_tiny`` was written once by ``fixtures/make_verl_oldtorch_fixture.py``
in a separate torch 2.7.1 venv: verl 0.5's default FSDP1 ``SHARDED_STATE_DICT`` checkpoints at
world size 2 (DTensor ``Shard(0)`` values over a ``DeviceMesh`` pickled in torch 2.7's layout:
``mesh`` tensor, ``mesh_dim_names``, ``_coordinate_on_dim``). A newer torch's own ``torch.load``
rebuilds that mesh without the attributes it expects, so nextoffline must read and patch these
files without unpickling torch's classes; the old torch then loads the result as it loaded the
original (checked once with ``make_verl_oldtorch_fixture.py check``, see fixtures/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # registers DTensor for torch.load(weights_only=True)
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nextoffline.cli import main
from nextoffline.formats.lora_keys import peft_key
from nextoffline.formats.verl import VerlFormat, load_lora_state
from nextoffline.io.torch_zip import SubclassRef, TensorRef, read_structure, state_of
from tests.conftest import FIXTURES, REPO, tree_hashes

ROOT = FIXTURES / "verl_torch27_lora_tiny"
WORLD = 2
STEPS = [2, 4, 6, 8]


def shard(step: int, rank: int, root: Path = ROOT) -> Path:
    return root / f"global_step_{step}" / "actor" / f"model_world_size_{WORLD}_rank_{rank}.pt"


def local_blocks(path: Path) -> dict[str, torch.Tensor]:
    """Every value of one shard as plain tensors (DTensors by their local block), via torch's safe loader."""
    state = torch.load(path, weights_only=True)
    return {k: (v._local_tensor if hasattr(v, "_local_tensor") else v) for k, v in state.items()}


def test_fixture_holds_torch27_device_mesh_pickles() -> None:
    """The fixture exercises the pre-2.9 mesh layout (a ``mesh`` tensor, no ``_layout``)."""
    for rank in range(WORLD):
        state = read_structure(shard(8, rank))
        dtensors = [v for k, v in state.items() if peft_key(k)]
        assert len(dtensors) == 28 and all(isinstance(v, SubclassRef) and v.cls_path.endswith(".DTensor") for v in dtensors)
        mesh = state_of(state_of(dtensors[0].state["_spec"])["mesh"])
        assert isinstance(mesh["mesh"], TensorRef) and "_layout" not in mesh and "_rank_map" not in mesh
        assert mesh["mesh_dim_names"] == ("fsdp",) and mesh["_coordinate_on_dim"] == [rank]


@pytest.mark.parametrize("step", STEPS)
def test_shards_assemble_to_the_lora_adapter_verl_wrote(step: int) -> None:
    adapter = load_file(ROOT / f"global_step_{step}" / "actor" / "lora_adapter" / "adapter_model.safetensors")
    assembled = load_lora_state(shard(step, 0))
    assert assembled.keys() == adapter.keys() and len(adapter) == 28
    assert all(torch.equal(assembled[k], adapter[k]) for k in adapter)  # one run, fp32 both: exact
    oracle = [local_blocks(shard(step, r)) for r in range(WORLD)]
    for key in oracle[0]:
        if peft_key(key):
            assert torch.equal(torch.cat([o[key] for o in oracle]), adapter[peft_key(key)])


def test_inspect_reads_the_run() -> None:
    result = CliRunner().invoke(main, ["inspect", str(ROOT), "--json"])
    assert result.exit_code == 0, result.output
    assert '"verl"' in result.output
    refs = VerlFormat().list_steps(ROOT)
    assert [r.step for r in refs] == STEPS


@pytest.mark.slow
def test_resumable_rewrites_the_old_pickles_in_place(tmp_path: Path) -> None:
    before = tree_hashes(ROOT)
    out = tmp_path / "out"
    args = ["extrapolate", str(ROOT), "--out", str(out), "--to-step", "12", "--method", "linear", "--resumable", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert tree_hashes(ROOT) == before
    new = load_file(out / "adapter_model.safetensors")
    old = load_lora_state(shard(8, 0))
    resume = out / "resume"
    assert (resume / "latest_checkpointed_iteration.txt").read_text() == "8"
    written = load_lora_state(shard(8, 0, resume))
    assert written.keys() == new.keys() == old.keys()
    for key in new:  # fp32 in, fp32 out: no cast, so exact
        assert written[key].dtype == old[key].dtype == torch.float32
        assert torch.equal(written[key], new[key]), key
        assert not torch.equal(written[key], old[key]), key
    refreshed = load_file(resume / "global_step_8" / "actor" / "lora_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(refreshed[k], new[k]) for k in new)
    for rank in range(WORLD):
        src_path, dst_path = shard(8, rank), shard(8, rank, resume)
        src, dst = local_blocks(src_path), local_blocks(dst_path)
        assert list(src) == list(dst)
        for key in src:
            if peft_key(key) is None:
                assert torch.equal(dst[key], src[key]), key
        assert_only_lora_records_changed(src_path, dst_path)
    changed = {k for k, v in tree_hashes(resume / "global_step_8").items() if before["global_step_8/" + k] != v}
    rewritten = {f"actor/model_world_size_{WORLD}_rank_{r}.pt" for r in range(WORLD)} | {"actor/lora_adapter/adapter_model.safetensors"}
    assert changed == rewritten


def assert_only_lora_records_changed(src: Path, dst: Path) -> None:
    """Byte level: the pickle (DTensor/DeviceMesh state as torch 2.7 wrote it) and every non-LoRA storage are identical."""
    lora_storages = {v.state["_local_tensor"].storage.key for k, v in read_structure(src).items() if peft_key(k)}
    with zipfile.ZipFile(src) as original, zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None  # CRCs of the patched records were updated
        assert [i.filename for i in archive.infolist()] == [i.filename for i in original.infolist()]
        for info in original.infolist():
            storage = info.filename.split("/data/")[-1] if "/data/" in info.filename else None
            if storage not in lora_storages:
                assert archive.read(info.filename) == original.read(info.filename), info.filename
        assert any(archive.read(n) != original.read(n) for n in original.namelist() if n.split("/data/")[-1] in lora_storages)
    assert src.stat().st_size == dst.stat().st_size


OLD_TORCH_PYTHON = os.environ.get("NEXTOFFLINE_OLD_TORCH_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not OLD_TORCH_PYTHON, reason="set NEXTOFFLINE_OLD_TORCH_PYTHON to a python with torch 2.6-2.8 (fixtures/README.md)")
def test_old_torch_fsdp1_resume_loads_the_extrapolation(tmp_path: Path) -> None:
    """verl's FSDP1 resume (torch.load + load_state_dict under SHARDED_STATE_DICT) run by the torch that wrote the files."""
    latest = VerlFormat().list_steps(ROOT)[-1]
    old = load_lora_state(shard(8, 0))
    new = {k: v * 1.5 + 0.01 for k, v in old.items()}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(new, str(adapter / "adapter_model.safetensors"))
    shutil.copy(latest.adapter_dir / "adapter_config.json", adapter)
    out = tmp_path / "resume"
    out.mkdir()
    VerlFormat().write_resumable(latest, adapter, out)
    script = FIXTURES / "make_verl_oldtorch_fixture.py"
    for actor, name in ((out / "global_step_8" / "actor", "resumed"), (ROOT / "global_step_8" / "actor", "original")):
        expected = tmp_path / f"{name}.safetensors"
        save_file(new, str(expected))
        subprocess.run([OLD_TORCH_PYTHON, str(script), "check", str(actor), str(expected)], check=True, timeout=600, cwd=REPO)
        result = json.loads(expected.with_suffix(".json").read_text())
        assert result["ok"] is (name == "resumed") and result["keys"] == 28 and result["torch"][:4] in ("2.6.", "2.7.", "2.8."), result
