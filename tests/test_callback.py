"""ExtrapolationCallback inside a real TRL GRPOTrainer + LoRA run (CPU, tiny model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FIXTURES
from tests.tiny_models import run_tiny_grpo

pytest.importorskip("trl")

from transformers import TrainerCallback

from nextoffline.errors import UsageError
from nextoffline.integrations.live import LiveLora, adjust_moments
from nextoffline.integrations.trl import ExtrapolationCallback, read_ledger


class WeightsAt(TrainerCallback):
    """Records the LoRA weights (saved-adapter keys) at the start of the given steps, and the log history."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        if step in self.steps:
            lora = LiveLora.from_model(model)
            self.weights[step] = lora.snapshot()
            inner = getattr(optimizer, "optimizer", optimizer)
            self.optimizer[step] = {
                k: {n: v.clone() for n, v in inner.state[p].items() if torch.is_tensor(v)}
                for k, p in lora.params.items()
                if p in inner.state
            }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(FIXTURES / "tiny_base", folder)
    return folder


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_jump_at_step_8_is_what_step_9_trains_from(tmp_path: Path, base: Path) -> None:
    run = tmp_path / "run"
    probe = WeightsAt({9})
    callback = ExtrapolationCallback(at_steps=[8], method="linear", coef=1.0)
    trainer = run_tiny_grpo(run, base_dir=base, max_steps=12, save_steps=1, callbacks=[callback, probe])
    assert trainer.state.global_step == 12 and (run / "checkpoint-12" / "adapter_model.safetensors").is_file()

    folder = run / "nextoffline" / "step_8"
    written = load_file(folder / "adapter_model.safetensors")
    checkpoint = load_file(run / "checkpoint-8" / "adapter_model.safetensors")
    _assert_equal(probe.weights[9], written)  # the 9th optimizer step starts from the extrapolated adapter
    assert any(not torch.equal(written[k], checkpoint[k]) for k in written)
    manifest = json.loads((folder / "nextoffline.json").read_text())
    assert manifest["extrapolation"]["method"] == "linear" and manifest["source"]["steps"] == list(range(1, 9))
    assert (folder / "adapter_config.json").is_file() and (folder / "README.md").is_file()

    (record,) = callback.records
    assert record.applied and record.step == 8 and record.method == "linear" and record.coef == 1.0
    assert read_ledger(run)[8] == record
    logged = [h for h in trainer.state.log_history if "nextoffline/applied" in h]
    assert len(logged) == 1 and logged[0]["step"] == 9 and logged[0]["nextoffline/method"] == "linear"
    assert logged[0]["nextoffline/applied"] == 1.0 and logged[0]["nextoffline/coef"] == 1.0
    assert 0 < logged[0]["nextoffline/backtest_error"] < 100


@pytest.mark.slow
def test_resume_after_a_jump_continues_the_same_run(tmp_path: Path, base: Path) -> None:
    """A forced save at a non-save step, then resuming from the jump step and from after it reproduce the run."""
    run = tmp_path / "run"
    kwargs = {"at_steps": [7], "method": "linear", "coef": 1.0, "optimizer_moments": "reset"}
    run_tiny_grpo(run, base_dir=base, max_steps=10, save_steps=2, callbacks=[ExtrapolationCallback(**kwargs)])
    assert (run / "checkpoint-7").is_dir() and not (run / "checkpoint-5").exists()  # step 7 was saved for the jump
    final = load_file(run / "checkpoint-10" / "adapter_model.safetensors")
    assert json.loads((run / "nextoffline" / "step_7" / "nextoffline.json").read_text())["source"]["steps"] == [2, 4, 6, 7]

    for start in ("checkpoint-7", "checkpoint-8"):
        resumed = tmp_path / f"resumed-{start}"
        shutil.copytree(run, resumed)
        shutil.rmtree(resumed / "checkpoint-10")
        probe = WeightsAt({8})
        run_tiny_grpo(
            resumed,
            base_dir=base,
            max_steps=10,
            save_steps=2,
            resume_from_checkpoint=str(resumed / start),
            callbacks=[ExtrapolationCallback(**kwargs), probe],
        )
        _assert_equal(load_file(resumed / "checkpoint-10" / "adapter_model.safetensors"), final)
        if start == "checkpoint-7":  # re-applied the recorded jump and the optimizer reset
            _assert_equal(probe.weights[8], load_file(run / "nextoffline" / "step_7" / "adapter_model.safetensors"))
            assert all(float(state["step"]) == 0 for state in probe.optimizer[8].values())


@pytest.mark.slow
def test_auto_that_keeps_the_weights_changes_nothing(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from nextoffline.pipeline import BacktestResult

    monkeypatch.setattr(BacktestResult, "best", lambda self, max_error=0.95: (None, 1.0))  # no predictor beats stopping
    run, plain = tmp_path / "run", tmp_path / "plain"
    callback = ExtrapolationCallback(every=4, method="auto", next_epochs=5)
    with caplog.at_level("INFO", logger="nextoffline"):
        trainer = run_tiny_grpo(run, base_dir=base, max_steps=9, save_steps=1, callbacks=[callback])
    run_tiny_grpo(plain, base_dir=base, max_steps=9, save_steps=1)
    records = {r.step: r for r in callback.records}
    assert set(records) == {4, 8} and not records[4].applied and "at least 3 are needed" in records[4].note
    assert not records[8].applied and records[8].method == "none" and "kept unchanged" in records[8].note
    assert "nextoffline at step 8" in caplog.text and "applied: no" in caplog.text
    assert (run / "nextoffline" / "step_8" / "adapter_model.safetensors").is_file()
    _assert_equal(
        load_file(run / "checkpoint-9" / "adapter_model.safetensors"), load_file(plain / "checkpoint-9" / "adapter_model.safetensors")
    )
    logged = [h for h in trainer.state.log_history if "nextoffline/applied" in h]
    assert [h["nextoffline/applied"] for h in logged] == [0.0, 0.0] and logged[1]["nextoffline/method"] == "none"


def test_eval_fn_rejects_a_worse_jump(tmp_path: Path, base: Path) -> None:
    scores = iter([0.0, 1.0])  # after the jump, then before it: the jump scores worse
    callback = ExtrapolationCallback(at_steps=[4], method="linear", eval_fn=lambda model: next(scores))
    probe = WeightsAt({5})
    run = tmp_path / "run"
    run_tiny_grpo(run, base_dir=base, max_steps=5, save_steps=1, callbacks=[callback, probe])
    (record,) = callback.records
    assert not record.applied and record.score_after == 0.0 and record.score_before == 1.0 and "rejected" in record.note
    _assert_equal(probe.weights[5], load_file(run / "checkpoint-4" / "adapter_model.safetensors"))


def test_refuses_deepspeed_and_fsdp_at_construction(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base: Path) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="does not support FSDP"):
        run_tiny_grpo(tmp_path / "run", base_dir=base, max_steps=1, callbacks=[ExtrapolationCallback(at_steps=[1])])
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_refuses_deepspeed_from_the_training_arguments() -> None:
    from types import SimpleNamespace

    from nextoffline.integrations.trl import _check_parallelism

    with pytest.raises(UsageError, match="does not support DeepSpeed"):
        _check_parallelism(SimpleNamespace(deepspeed="ds_zero3.json", fsdp=[]))
    with pytest.raises(UsageError, match="does not support FSDP"):
        _check_parallelism(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]))
    _check_parallelism(SimpleNamespace(deepspeed=None, fsdp=[], distributed_state=SimpleNamespace(distributed_type="MULTI_GPU")))


def test_options_are_checked() -> None:
    for kwargs in (
        {},
        {"at_steps": [2], "every": 2},
        {"every": 0},
        {"at_steps": [3], "coef": 0.0},
        {"at_steps": [3], "optimizer_moments": "x"},
    ):
        with pytest.raises(UsageError):
            ExtrapolationCallback(**kwargs)
    with pytest.raises(Exception, match="linearr"):
        ExtrapolationCallback(at_steps=[3], method="linearr")
    assert not ExtrapolationCallback(at_steps=[4]).is_trigger(4, 4)  # nothing would train from a jump at the last step
    assert ExtrapolationCallback(every=3).is_trigger(6, 10)


def test_adjust_moments_policies() -> None:
    """reset zeroes moments and step; rescale multiplies B's moments by |A_new|/|A_old| (and squared)."""
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4, 2))
    lora = LiveLora({"m.lora_A.weight": a, "m.lora_B.weight": b})
    optimizer = torch.optim.AdamW([a, b], lr=0.1)
    (a.sum() + b.sum()).backward()
    optimizer.step()
    before = lora.snapshot()
    with torch.no_grad():
        a.mul_(2.0)
    m_b, v_b = optimizer.state[b]["exp_avg"].clone(), optimizer.state[b]["exp_avg_sq"].clone()
    m_a = optimizer.state[a]["exp_avg"].clone()
    assert adjust_moments(optimizer, lora, before, "rescale") == 2
    torch.testing.assert_close(optimizer.state[b]["exp_avg"], 2 * m_b)
    torch.testing.assert_close(optimizer.state[b]["exp_avg_sq"], 4 * v_b)
    torch.testing.assert_close(optimizer.state[a]["exp_avg"], m_a)  # B did not move
    assert adjust_moments(optimizer, lora, before, "reset") == 2
    assert float(optimizer.state[a]["step"]) == 0 and not optimizer.state[a]["exp_avg_sq"].any()
    assert adjust_moments(optimizer, lora, before, "keep") == 0


DDP_WORKER = r"""
import os, sys, torch
import torch.distributed as dist
from nextoffline.integrations.live import LiveLora, broadcast_from_main

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
params = {"m.lora_A.weight": torch.nn.Parameter(torch.randn(2, 6)), "m.lora_B.weight": torch.nn.Parameter(torch.randn(5, 2))}
lora = LiveLora(dict(params))
before = lora.snapshot()
if rank == 0:  # only the main process computes the jump
    lora.load({k: v + 1 for k, v in before.items()}, source="test")
applied = broadcast_from_main(lora, rank == 0)
after = {k: p.detach().clone() for k, p in params.items()}  # the Parameter objects created above: written in place
torch.save({"applied": applied, "after": after, "before": before}, sys.argv[1] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ranks_receive_the_main_process_jump(tmp_path: Path) -> None:
    """Two gloo processes: rank 0 writes the jump in place, broadcast_from_main copies it into rank 1's live parameters."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DDP_WORKER, str(tmp_path)], env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(r["applied"] for r in results)
    _assert_equal(results[0]["before"], results[1]["before"])
    _assert_equal(results[1]["after"], {k: v + 1 for k, v in results[1]["before"].items()})
