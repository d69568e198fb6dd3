"""``nextoffline watch``: a writer process saves a verl run over time; watch waits, writes once, or leaves nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nextoffline.cli import main
from nextoffline.errors import UsageError
from nextoffline.integrations.watch import check_step
from tests.conftest import FIXTURES

VERL = FIXTURES / "verl_lora_tiny"  # verl 0.7: shards plus lora_adapter/ (what is read)
ADAPTER = "lora_adapter/adapter_model.safetensors"

#: Saves global_step_2 and _4 (tracker after each), then global_step_6 with a half-written adapter file,
#: completes it after a pause and only then moves the tracker; then leaves a broken global_step_8.
WRITER = r"""
import shutil, sys, time
from pathlib import Path
src, run, pause = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
tracker = run / "latest_checkpointed_iteration.txt"
for step in (2, 4):
    shutil.copytree(src / f"global_step_{step}", run / f"global_step_{step}")
    tracker.write_text(str(step))
    time.sleep(pause)
shutil.copytree(src / "global_step_6", run / "global_step_6")
shard = run / "global_step_6" / "actor" / sys.argv[4]
full = shard.read_bytes()
shard.write_bytes(full[: len(full) // 2])
print("half", time.time(), flush=True)
time.sleep(4 * pause)
shard.write_bytes(full)
tracker.write_text("6")
print("complete", time.time(), flush=True)
time.sleep(pause)
shutil.copytree(src / "global_step_8", run / "global_step_8")
broken = run / "global_step_8" / "actor" / sys.argv[4]
broken.write_bytes(broken.read_bytes()[:100])
"""


def _nextoffline(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nextoffline", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.mark.slow
def test_watch_waits_for_the_complete_checkpoint_and_writes_once(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "next"
    run.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(VERL), str(run), "0.25", ADAPTER], stdout=subprocess.PIPE, text=True)
    watch = _nextoffline(
        "watch", str(run), "--at-step", "6", "--method", "linear", "--coef", "1", "--out", str(out), "--poll", "0.1", "--timeout", "60",
        "--exec", "echo resumed-from {checkpoint} step {step}",
    )  # fmt: skip
    stdout, stderr = watch.communicate(timeout=120)
    writer_out, _ = writer.communicate(timeout=30)
    finished = time.time()
    assert watch.returncode == 0, stderr
    completed = float(next(line for line in writer_out.splitlines() if line.startswith("complete")).split()[1])
    assert completed < finished
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["source"]["steps"] == [2, 4, 6] and manifest["resume"]["format"] == "verl"
    assert manifest["source"]["files"][-1]["weights_sha256"] == _sha256(VERL / "global_step_6" / "actor" / ADAPTER)
    for rank in range(2):  # the resumable checkpoint holds every shard
        assert (out / "resume" / "global_step_6" / "actor" / f"model_world_size_2_rank_{rank}.pt").is_file()
    assert (out / "resume" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert stdout.count("resume with:") == 1  # extrapolated once
    assert f"resumed-from {out / 'resume' / 'global_step_6'} step 6" in stdout
    assert _leftovers(tmp_path, "next") == ["next"]


@pytest.mark.slow
def test_watch_interrupted_while_waiting_or_writing_leaves_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    for step, env in ((100, {}), (6, {"NEXTOFFLINE_TEST_WRITE_DELAY": "1"})):  # waiting forever; then mid-write
        out = tmp_path / f"out{step}"
        watch = _nextoffline(
            "watch", str(run), "--at-step", str(step), "--method", "linear", "--coef", "1", "--out", str(out), "--poll", "0.1", env=env
        )
        deadline = time.time() + 60
        deadline = time.time() + 60
        while time.time() < deadline and not (any(tmp_path.glob(f".out{step}.tmp-*")) if env else _waiting(run, watch)):
            time.sleep(0.05)
        time.sleep(0.3)
        watch.send_signal(signal.SIGINT)
        _, stderr = watch.communicate(timeout=30)
        assert watch.returncode == 130, stderr
        assert "interrupted; nothing partial was left behind" in stderr
        assert _leftovers(tmp_path, out.name) == []


def _waiting(run: Path, proc: subprocess.Popen) -> bool:
    """The watcher has started polling (it logs that it waits)."""
    assert proc.stderr is not None
    return "waiting for checkpoint" in proc.stderr.readline()


def test_watch_times_out_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(VERL, run)
    args = ["watch", str(run), "--at-step", "10", "--coef", "1", "--out", str(tmp_path / "o"), "--poll", "0.05", "--timeout", "0.3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 124
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "checkpoint 10 not complete after 0.3s" in line and "latest saved step is 8" in line
    assert not (tmp_path / "o").exists()


def test_check_step_uses_each_trainers_marker(tmp_path: Path) -> None:
    trl = tmp_path / "trl"
    shutil.copytree(FIXTURES / "trl_grpo_tiny", trl)
    assert check_step(trl, 8).snapshot is not None
    (trl / "checkpoint-8" / "trainer_state.json").unlink()  # Trainer writes it last
    status = check_step(trl, 8)
    assert status.snapshot is None and "trainer_state.json not written yet" in status.reason
    with pytest.raises(UsageError, match="step 5 was not saved"):
        check_step(VERL, 5)

    orl = tmp_path / "openrlhf"
    shutil.copytree(FIXTURES / "openrlhf_lora_tiny", orl)
    assert check_step(orl, 8).snapshot is not None
    (orl / "_actor" / "latest").write_text("global_step6")
    status = check_step(orl, 8)
    assert status.snapshot is None and "latest names step 6" in status.reason
    assert check_step(tmp_path / "missing", 2).reason.endswith("does not exist yet")
