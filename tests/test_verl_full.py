"""verl FSDP full-parameter runs (``fixtures/verl_full_tiny``, the law of ``fixtures/fullparam_sqrt``
saved by FSDP2 on 3 ranks): probing beside verl LoRA runs, header-only reading of DTensor shards
(uneven, empty and dim-1 chunks), extrapolation equal to the same run saved as HF folders,
``--resumable`` loaded back by FSDP2, the ``huggingface/`` fallbacks and one-line refusals."""

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
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.dense.layout import is_dense_source, load_dense_trajectory
from nextoffline.dense.stream import FileHandles, read_slab
from nextoffline.dense.verl_fsdp import block_pieces, read_step
from nextoffline.formats.lora_keys import peft_key
from nextoffline.formats.verl import ShardEntry, load_lora_state
from nextoffline.io.torch_zip import StorageRef, TensorRef
from tests.conftest import FIXTURES, REPO, torchrun_cli, tree_hashes

sys.path.insert(0, str(FIXTURES))
from make_fullparam_fixture import law_weights

RUN = FIXTURES / "verl_full_tiny"
HF_RUN = FIXTURES / "fullparam_sqrt"
BASE = FIXTURES / "tiny_base"
STEPS = (10, 20, 30, 40, 50, 60, 70, 80)
LATEST = RUN / "global_step_80"
#: `auto` on these tiny models would include NExt (projected within --next-budget); these tests are about the layout
NO_NEXT = ("--next-budget", 0)


def cli(*args: object):
    return CliRunner().invoke(main, [*map(str, args), "--quiet"])


def _copy(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    return run


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One extrapolation to step 120 of the verl run (with --resumable) and of the same law as HF folders."""
    tmp = tmp_path_factory.mktemp("verl_full")
    before = tree_hashes(RUN)
    verl = cli("extrapolate", RUN, "--to-step", 120, "--out", tmp / "verl", "--resumable", "--device", "cpu", *NO_NEXT)
    hf = cli("extrapolate", HF_RUN, "--to-step", 120, "--out", tmp / "hf", "--device", "cpu", *NO_NEXT)
    return {"tmp": tmp, "verl": verl, "hf": hf, "unchanged": tree_hashes(RUN) == before}


# ------------------------------------------------------------------------------------ reading


def test_probe_takes_full_parameter_runs_and_leaves_lora_runs() -> None:
    assert is_dense_source(RUN)
    for lora in ("verl_lora_tiny", "verl09_lora_tiny", "verl_torch27_lora_tiny"):
        assert not is_dense_source(FIXTURES / lora), lora
    trajectory = load_dense_trajectory(RUN)
    assert trajectory.layout == "verl-fsdp" and trajectory.step_numbers == list(STEPS)
    assert trajectory.model_files_dir == LATEST / "actor" / "huggingface"
    assert trajectory.latest.files == tuple(f"actor/model_world_size_3_rank_{r}.pt" for r in range(3))
    assert set(trajectory.output_dtypes.values()) == {torch.float32}  # the dtype of verl's own huggingface/ export


def test_reading_equals_the_gathered_weights() -> None:
    trajectory = load_dense_trajectory(RUN)
    base = load_file(BASE / "model.safetensors")
    with FileHandles() as handles:
        for checkpoint in trajectory.checkpoints:
            gathered = load_file(checkpoint.folder / "actor" / "huggingface" / "model.safetensors")  # full_tensor() on 3 ranks
            truth = law_weights(base, checkpoint.step)
            for key, entry in checkpoint.entries.items():
                value = read_slab(handles, checkpoint, key, 0, entry.numel).reshape(entry.shape)
                assert torch.equal(value, gathered[key]) and torch.equal(value, truth[key]), (checkpoint.step, key)
    pieces = {k: len(e.pieces) for k, e in trajectory.latest.entries.items()}
    assert pieces["model.layers.0.mlp.down_proj.weight"] == 3 * 32  # Shard(1): one run per row and rank
    assert pieces["lm_head.weight"] == 3  # Shard(0) of 17 rows: 6, 6, 5


@pytest.mark.parametrize(("shape", "dim"), [((5, 6), 0), ((5, 6), 1), ((3,), 0), ((2, 3, 4), 1), ((1, 4), 0)])
def test_block_pieces_tile_uneven_and_empty_chunks(shape: tuple[int, ...], dim: int) -> None:
    world = 4
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    files: dict[str, bytes] = {}
    pieces = []
    for rank, local in enumerate(torch.chunk(full, world, dim)):
        lo = sum(c.shape[dim] for c in torch.chunk(full, world, dim)[:rank])
        bounds = tuple((lo, lo + local.shape[dim]) if d == dim else (0, s) for d, s in enumerate(shape))
        if local.numel() == 0:  # torch.chunk drops trailing empty chunks; FSDP keeps them as empty local tensors
            bounds = tuple((s, s) if d == dim else (0, s) for d, s in enumerate(shape))
        ref = TensorRef(StorageRef(str(rank), torch.float32, local.numel()), 0, tuple(local.shape), local.contiguous().stride())
        files[f"r{rank}"] = b"pad!" + local.contiguous().numpy().tobytes()
        pieces += block_pieces(f"r{rank}", 4, ShardEntry("w", ref, shape, bounds))
    flat = torch.full((full.numel(),), -1.0)
    for piece in pieces:
        raw = files[piece.file][piece.offset : piece.offset + 4 * piece.numel]
        flat[piece.start : piece.start + piece.numel] = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    assert torch.equal(flat.reshape(shape), full)
    assert sum(p.numel for p in pieces) == full.numel()


@pytest.mark.parametrize(("name", "world"), [("verl_lora_tiny", 2), ("verl09_lora_tiny", 3), ("verl_torch27_lora_tiny", 2)])
def test_pieces_agree_with_the_lora_reader_on_fsdp1_and_fsdp2_shards(name: str, world: int) -> None:
    """Every tensor of the LoRA fixtures' shards as pieces (FSDP2 2 and 3 ranks with empty and dim-1
    chunks; FSDP1 pickled by torch 2.7): the LoRA tensors equal what the LoRA reader assembles."""
    folder = FIXTURES / name / "global_step_8"
    checkpoint, copies = read_step(8, folder)
    lora = load_lora_state(folder / "actor" / f"model_world_size_{world}_rank_0.pt")
    with FileHandles() as handles:
        for key, entry in checkpoint.entries.items():
            if peft_key(key) is not None:
                value = read_slab(handles, checkpoint, key, 0, entry.numel).reshape(entry.shape)
                assert torch.equal(value, lora.pop(peft_key(key))), key
    assert not lora and not copies and len(checkpoint.entries) == 49


def test_single_rank_plain_tensors_and_replicated_buffers(tmp_path: Path) -> None:
    """World size 1 (plain tensors, one piece each; a tied alias dropped), and a tensor every rank saves
    whole (read once, rewritten in every file)."""
    for step in (1, 2, 3):
        actor = tmp_path / "w1" / f"global_step_{step}" / "actor"
        actor.mkdir(parents=True)
        w = torch.full((4, 3), float(step))
        torch.save({"w": w, "b": torch.arange(3.0) * step, "tied": w}, actor / "model_world_size_1_rank_0.pt")
    trajectory = load_dense_trajectory(tmp_path / "w1")  # "tied" shares w's storage: dropped, as save_pretrained drops tied weights
    assert trajectory.layout == "verl-fsdp" and trajectory.output_dtypes == {"w": torch.bfloat16, "b": torch.bfloat16}
    with FileHandles() as handles:
        assert torch.equal(read_slab(handles, trajectory.latest, "b", 0, 3), torch.arange(3.0) * 3)
    for step in (1, 2, 3):
        actor = tmp_path / "w2" / f"global_step_{step}" / "actor"
        actor.mkdir(parents=True)
        for rank in range(2):
            torch.save({"buf": torch.arange(5.0) + step}, actor / f"model_world_size_2_rank_{rank}.pt")
    checkpoint, copies = read_step(3, tmp_path / "w2" / "global_step_3")
    assert [p.file for p in checkpoint.entries["buf"].pieces] == ["actor/model_world_size_2_rank_0.pt"]
    assert [p.file for c in copies["buf"] for p in c.pieces] == ["actor/model_world_size_2_rank_1.pt"]


def test_ranks_holding_the_same_elements_are_refused_by_name() -> None:
    """HSDP (replicas over a 2-D mesh) or tensor parallelism: two ranks' blocks overlap."""
    from nextoffline.dense.verl_fsdp import _assemble
    from nextoffline.errors import AdapterFileError

    blocks = []
    for rank in range(2):  # both ranks hold rows [0, 2) of a (4, 3) tensor
        ref = TensorRef(StorageRef("0", torch.float32, 6), 0, (2, 3), (3, 1))
        entry = ShardEntry("w", ref, (4, 3), ((0, 2), (0, 3)))
        blocks.append((Path(f"r{rank}.pt"), entry, block_pieces(f"r{rank}.pt", 0, entry)))
    with pytest.raises(AdapterFileError, match="several ranks hold the same elements of w .HSDP"):
        _assemble(Path("global_step_1"), "w", blocks)


# ------------------------------------------------------------------------------------ extrapolate


def test_extrapolation_equals_the_same_run_saved_as_hf_folders(outputs: dict) -> None:
    from transformers import AutoModelForCausalLM

    assert outputs["verl"].exit_code == 0, outputs["verl"].output
    assert outputs["hf"].exit_code == 0, outputs["hf"].output
    assert outputs["unchanged"]
    out, ref = outputs["tmp"] / "verl", outputs["tmp"] / "hf"
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    truth = law_weights(load_file(BASE / "model.safetensors"), 120)
    latest = load_file(LATEST / "actor" / "huggingface" / "model.safetensors")
    num = sum(float((got[k] - truth[k]).double().square().sum()) for k in truth)
    den = sum(float((latest[k] - truth[k]).double().square().sum()) for k in truth)
    assert (num / den) ** 0.5 < 1e-3  # stopping at step 80 = 1.0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # verl's export config says bfloat16 (as here)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], got["lm_head.weight"])
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (LATEST / "actor" / "huggingface" / name).read_bytes()
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["source"]["format"] == "verl-fsdp" and manifest["extrapolation"]["method"] == "power"


def test_resumable_is_loaded_by_fsdp2_with_the_extrapolated_weights(outputs: dict) -> None:
    out = outputs["tmp"] / "verl"
    resume = out / "resume" / "global_step_80"
    assert f"trainer.resume_from_path={resume}" in outputs["verl"].output
    for name in [f"actor/{kind}_world_size_3_rank_{r}.pt" for kind in ("optim", "extra_state") for r in range(3)] + ["data.pt"]:
        assert (resume / name).read_bytes() == (LATEST / name).read_bytes(), name
    for rank in range(3):  # bytes written in place, CRCs refreshed: a valid zip for any reader
        with zipfile.ZipFile(resume / "actor" / f"model_world_size_3_rank_{rank}.pt") as archive:
            assert archive.testzip() is None
    exported = load_file(resume / "actor" / "huggingface" / "model.safetensors")
    expected = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    subprocess.run(
        [
            sys.executable,
            str(FIXTURES / "make_verl_full_fixture.py"),
            "check",
            str(out / "model.safetensors"),
            str(resume / "actor"),
            str(LATEST / "actor"),
        ],
        check=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    resumed, original = json.loads((out / "model.json").read_text())
    assert resumed["equal"] and resumed["max_abs"] == 0.0
    assert not original["equal"] and original["max_abs"] > 1e-2


# ------------------------------------------------------------------------------------ fallbacks


def test_without_exported_weights_the_output_is_bf16_as_verl_model_merger_writes(tmp_path: Path, outputs: dict) -> None:
    run = _copy(tmp_path)
    for step in STEPS:
        (run / f"global_step_{step}" / "actor" / "huggingface" / "model.safetensors").unlink()
    result = cli("extrapolate", run, "--to-step", 120, "--out", tmp_path / "out", "--resumable", "--device", "cpu", *NO_NEXT)
    assert result.exit_code == 0, result.output
    got, fp32 = load_file(tmp_path / "out" / "model.safetensors"), load_file(outputs["tmp"] / "verl" / "model.safetensors")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert all(torch.equal(got[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert not (tmp_path / "out" / "resume" / "global_step_80" / "actor" / "huggingface" / "model.safetensors").exists()


def test_huggingface_weights_alone_are_read_as_model_folders(tmp_path: Path, outputs: dict) -> None:
    run = _copy(tmp_path)
    for path in run.glob("global_step_*/actor/model_world_size_*.pt"):
        path.unlink()
    trajectory = load_dense_trajectory(run)
    assert trajectory.layout == "verl-hf" and trajectory.step_numbers == list(STEPS)
    result = cli("extrapolate", run, "--to-step", 120, "--out", tmp_path / "out", "--device", "cpu", *NO_NEXT)
    assert result.exit_code == 0, result.output
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(outputs["tmp"] / "verl" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    refused = cli("extrapolate", run, "--to-step", 120, "--out", tmp_path / "out2", "--resumable", *NO_NEXT)
    assert refused.exit_code != 0 and "verl resumes only from them" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_damaged_rank_file_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    run = _copy(tmp_path)
    shard = run / "global_step_40" / "actor" / "model_world_size_3_rank_1.pt"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:20000])
    before = tree_hashes(run)
    result = cli("extrapolate", run, "--to-step", 120, "--out", tmp_path / "out", *NO_NEXT)
    assert result.exit_code != 0
    assert str(shard) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_hashes(run) == before and not (tmp_path / "out").exists()


def test_resumable_refuses_a_weight_file_it_does_not_rewrite(tmp_path: Path) -> None:
    run = _copy(tmp_path)
    stray = run / "global_step_80" / "actor" / "ref" / "model_world_size_3_rank_0.pt"
    stray.parent.mkdir()
    shutil.copyfile(LATEST / "actor" / "model_world_size_3_rank_0.pt", stray)
    result = cli("extrapolate", run, "--to-step", 120, "--out", tmp_path / "out", "--resumable", *NO_NEXT)
    assert result.exit_code != 0 and str(stray) in result.stderr and "not rewritten by --resumable" in result.stderr


def test_torchrun_two_processes_write_byte_identical_pieced_output(tmp_path: Path) -> None:
    """Tensors split over rank files (pieces) under torchrun: the model folder and every rewritten rank
    shard of the --resumable copy are byte-identical to the single-process run's."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["extrapolate", str(RUN), "--coef", "1", "--method", "power", "--device", "cpu", "--chunk-mb", "1", "--resumable"]
    result = cli(*args, "--out", single)
    assert result.exit_code == 0, result.output
    proc = torchrun_cli([*args, "--quiet", "--out", str(multi)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt"))
    assert any(p.name.startswith("model_world_size") for p in files) and any(p.suffix == ".safetensors" for p in files)
    for name in files:
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
    assert json.loads((multi / "nextoffline.json").read_text())["processes"] == 2
