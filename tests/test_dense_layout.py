"""Full-parameter layouts beyond one safetensors run per tensor: tensors split into pieces over
several files (as sharded trainer states store them) read and written slab by slab, and fresh
HF shards for the output when the source is not a safetensors model folder."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextoffline.dense.layout import DenseCheckpoint, DenseTrajectory, Piece, TensorEntry, WriteTarget, load_dense_trajectory
from nextoffline.dense.model_folder import fresh_plan, plan_model_folder
from nextoffline.dense.output import run_dense_extrapolate
from nextoffline.dense.stream import FileHandles, read_slab, write_slab
from nextoffline.errors import AdapterFileError
from tests.conftest import FIXTURES

RUN = FIXTURES / "fullparam_sqrt"
CPU = torch.device("cpu")


def _split_into_rank_files(checkpoint: DenseCheckpoint, folder: Path, ranks: int = 3) -> DenseCheckpoint:
    """The checkpoint's tensors rewritten as ``ranks`` flat files of uneven pieces with padding between
    (what a sharded trainer state looks like to the reader), described by :class:`Piece` runs."""
    folder.mkdir(parents=True)
    values = load_file(checkpoint.folder / "model.safetensors")
    buffers: list[bytearray] = [bytearray(b"\x00" * 24) for _ in range(ranks)]  # a header-like prefix
    entries = {}
    for number, key in enumerate(sorted(values)):
        flat = values[key].reshape(-1)
        cuts = sorted({0, flat.numel(), *((flat.numel() * (r + 1)) // (ranks + number % 2) for r in range(ranks - 1))})
        pieces = []
        for r, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            buffer = buffers[r % ranks]
            buffer += b"\x7f" * 5  # unaligned padding: offsets must be honoured exactly
            pieces.append(Piece(f"rank_{r % ranks}.bin", len(buffer), lo, hi - lo))
            buffer += flat[lo:hi].contiguous().view(torch.uint8).numpy().tobytes()
        entries[key] = TensorEntry(key, values[key].dtype, tuple(values[key].shape), tuple(pieces))
        entries[key].check_pieces(folder)
    for r, buffer in enumerate(buffers):
        (folder / f"rank_{r}.bin").write_bytes(bytes(buffer))
    return DenseCheckpoint(checkpoint.step, folder, entries, tuple(f"rank_{r}.bin" for r in range(ranks)))


@pytest.fixture(scope="module")
def pieced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DenseTrajectory, DenseTrajectory]:
    original = load_dense_trajectory(RUN)
    root = tmp_path_factory.mktemp("pieced")
    checkpoints = tuple(_split_into_rank_files(c, root / c.folder.name) for c in original.checkpoints)
    pieced = dataclasses.replace(
        original,
        layout="test-pieces",
        checkpoints=checkpoints,
        model_files_dir=original.latest.folder,
        output_dtypes={k: torch.bfloat16 for k in original.keys},
    )
    return original, pieced


def test_slabs_read_across_pieces_equal_the_tensor(pieced_run: tuple[DenseTrajectory, DenseTrajectory]) -> None:
    original, pieced = pieced_run
    with FileHandles() as handles:
        for key in original.keys:
            entry = original.latest.entries[key]
            whole = read_slab(handles, original.latest, key, 0, entry.numel).clone()
            for start, stop in [(0, entry.numel), (1, max(2, entry.numel // 3)), (entry.numel // 2, entry.numel)]:
                assert torch.equal(read_slab(handles, pieced.latest, key, start, stop), whole[start:stop])


def test_slab_writes_scatter_into_pieces(tmp_path: Path, pieced_run: tuple[DenseTrajectory, DenseTrajectory]) -> None:
    _, pieced = pieced_run
    latest = pieced.latest
    for name in latest.files:
        (tmp_path / name).write_bytes((latest.folder / name).read_bytes())
    key = max(latest.entries, key=lambda k: latest.entries[k].numel)
    entry = latest.entries[key]
    values = torch.arange(entry.numel, dtype=torch.float32).to(entry.dtype)
    with FileHandles(write=True) as handles:
        write_slab(handles, tmp_path, entry, 3, values[3:])
        write_slab(handles, tmp_path, entry, 0, values[:3])
    copy = dataclasses.replace(latest, folder=tmp_path)
    with FileHandles() as handles:
        assert torch.equal(read_slab(handles, copy, key, 0, entry.numel), values)


def test_pieces_that_leave_a_gap_are_refused(tmp_path: Path) -> None:
    entry = TensorEntry("w", torch.float32, (4, 3), (Piece("a", 0, 0, 5), Piece("b", 0, 6, 6)))
    with pytest.raises(AdapterFileError, match="do not cover its 12 elements"):
        entry.check_pieces(tmp_path)


def test_pieced_source_writes_fresh_bf16_shards_equal_to_the_safetensors_run(
    tmp_path: Path, pieced_run: tuple[DenseTrajectory, DenseTrajectory]
) -> None:
    from transformers import AutoModelForCausalLM

    original, pieced = pieced_run
    assert plan_model_folder(original).mirrored and not plan_model_folder(pieced).mirrored
    options = {"device": CPU, "chunk_bytes": 4096, "method": "power", "coefs": [1.0]}
    run_dense_extrapolate(original, out_dir=tmp_path / "a", **options)
    summary = run_dense_extrapolate(pieced, out_dir=tmp_path / "b", **options)
    want, got = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:  # same float32 arithmetic on the same values, stored as bf16
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want[key].to(torch.bfloat16)), key
    assert "config.json" in summary["copied_files"] and not any(n.endswith(".bin") for n in summary["copied_files"])
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.bfloat16).state_dict()
    shared = [k for k in got if k in state]
    assert len(shared) >= len(got) - 1 and all(torch.equal(state[k], got[k]) for k in shared)


def test_fresh_plan_shards_like_save_pretrained_and_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=gen),
        "b.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
        "c.weight": torch.randn(11, 4, generator=gen).to(torch.float16),
        "d.steps": torch.arange(6, dtype=torch.int64),
    }
    plan = fresh_plan({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, max_shard_bytes=100)
    assert [f.name for f in plan.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan.index is not None and set(plan.index["weight_map"]) == set(tensors)
    plan.create(tmp_path)
    target = plan.target()
    assert isinstance(target, WriteTarget)
    with FileHandles(write=True) as handles:
        for key, value in tensors.items():
            write_slab(handles, tmp_path, target.entries[key], 0, value.reshape(-1))
    loaded = {}
    for planned in plan.files:
        assert (tmp_path / planned.name).stat().st_size == planned.size
        loaded.update(load_file(tmp_path / planned.name))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    one = fresh_plan({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    assert [f.name for f in one.files] == ["model.safetensors"] and one.index is None
