"""Crash safety: runs of ``nextoffline extrapolate`` killed while writing never leave a partial ``--out``.

Real processes (``python -m nextoffline``) are started together and each is sent SIGINT or
SIGKILL at a random moment — most while the output is being written (the
``NEXTOFFLINE_TEST_WRITE_DELAY`` hook of :mod:`nextoffline.io.writer` makes each file take a
noticeable time), one at a random time from start. Afterwards every ``--out`` is either absent
or complete and valid, an ``--overwrite`` target is never missing, SIGINT leaves no temporary
folder, the next run cleans up after SIGKILL, and the source is unchanged.
The seed is printed on failure; set ``NEXTOFFLINE_KILL_SEED`` to replay it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.errors import OutputError
from nextoffline.io.writer import AtomicOutputDir, write_json
from nextoffline.synthetic import SyntheticSpec, write_synthetic_trajectory
from tests.conftest import tree_hashes

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

MODULES = [(f"model.layers.{i}.self_attn.{p}", 64, 64) for i in range(2) for p in ("q_proj", "v_proj")]
STEPS = [10, 20, 30, 40]
WRITE_DELAY = 0.2  # seconds after each file written and before the final rename
ARGS = ["--to-step", "60", "--method", "linear", "--device", "cpu", "-q"]


@dataclass
class Run:
    name: str
    sig: signal.Signals
    after_write_starts: bool = True
    overwrite: bool = False
    resumable: bool = False
    delay: float = 0.0
    proc: subprocess.Popen | None = None
    signalled: bool = False
    saw_tmp: bool = False
    log: list[str] = field(default_factory=list)


def _make_source(root: Path) -> Path:
    write_synthetic_trajectory(root, SyntheticSpec(steps=STEPS, modules=MODULES, rank=8, law="sqrt", noise=0.01))
    return root


def _tmp_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


def _assert_complete(out: Path, source: Path, resumable: bool) -> None:
    """A finished output: every file present and readable, every source key present, finite."""
    latest = load_file(source / f"step_{STEPS[-1]}" / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert written.keys() == latest.keys()
    for key, value in latest.items():
        assert written[key].shape == value.shape and written[key].dtype == value.dtype and torch.isfinite(written[key]).all()
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["source"]["steps"] == STEPS
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert "nextoffline" in (out / "README.md").read_text()
    if resumable:
        resumed = load_file(out / "resume" / f"step_{STEPS[-1]}" / "adapter_model.safetensors")
        assert resumed.keys() == latest.keys()
        assert manifest["resume"]["checkpoint_dir"]


def _watch_and_kill(run: Run, parent: Path, started: float) -> None:
    """Send the signal ``run.delay`` seconds after its temporary folder appears (or after start)."""
    assert run.proc is not None
    if run.after_write_starts:
        while run.proc.poll() is None and not _tmp_dirs(parent, run.name):
            time.sleep(0.005)
        run.saw_tmp = run.proc.poll() is None
        begin = time.monotonic()
    else:
        begin = started
    while run.proc.poll() is None and time.monotonic() - begin < run.delay:
        time.sleep(0.005)
    if run.proc.poll() is None:
        run.proc.send_signal(run.sig)
        run.signalled = True


def test_killed_runs_leave_complete_or_no_output(tmp_path: Path) -> None:
    seed = int(os.environ.get("NEXTOFFLINE_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    why = f"(replay with NEXTOFFLINE_KILL_SEED={seed})"
    source = _make_source(tmp_path / "src")
    before = tree_hashes(source)
    window = 6 * WRITE_DELAY  # ~files written + the pause before the rename (more with --resumable)

    runs = [
        Run("int_a", signal.SIGINT, delay=rng.uniform(0, window)),
        Run("int_b", signal.SIGINT, resumable=True, delay=rng.uniform(0, window)),
        Run("kill_a", signal.SIGKILL, delay=rng.uniform(0, window)),
        Run("kill_b", signal.SIGKILL, resumable=True, delay=rng.uniform(0, window)),
        Run("kill_overwrite", signal.SIGKILL, overwrite=True, delay=rng.uniform(0, window)),
        Run("int_overwrite", signal.SIGINT, overwrite=True, delay=rng.uniform(0, window)),
        Run("kill_anytime", signal.SIGKILL, after_write_starts=False, delay=rng.uniform(0.5, 8.0)),
    ]
    for run in runs:  # overwrite targets: a complete previous output, made in-process
        if run.overwrite:
            result = CliRunner().invoke(main, ["extrapolate", str(source), *ARGS, "--out", str(tmp_path / run.name)])
            assert result.exit_code == 0, result.output
            _assert_complete(tmp_path / run.name, source, resumable=False)

    env = {**os.environ, "NEXTOFFLINE_TEST_WRITE_DELAY": str(WRITE_DELAY), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    threads = []
    for run in runs:
        cmd = [sys.executable, "-m", "nextoffline", "extrapolate", str(source), *ARGS, "--out", str(tmp_path / run.name)]
        cmd += ["--overwrite"] if run.overwrite else []
        cmd += ["--resumable"] if run.resumable else []
        run.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        threads.append(threading.Thread(target=_watch_and_kill, args=(run, tmp_path, started), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    outputs = {}
    for run in runs:
        assert run.proc is not None
        outputs[run.name] = run.proc.communicate(timeout=240)

    summary = {r.name: (r.sig.name, round(r.delay, 2), r.signalled, r.saw_tmp, r.proc.returncode) for r in runs if r.proc}
    for run in runs:
        assert run.proc is not None
        out = tmp_path / run.name
        _stdout, stderr = outputs[run.name]
        context = f"{run.name}: {summary[run.name]} {why}\nstderr: {stderr[-1500:]}"
        assert "Traceback" not in stderr or (run.sig == signal.SIGINT and not run.saw_tmp), context
        if run.sig == signal.SIGKILL:
            assert run.proc.returncode in (0, -signal.SIGKILL), context
        else:  # SIGINT: handled as an interruption (130) unless the run had already finished
            assert run.proc.returncode in (0, 130, -signal.SIGINT), context
            if run.proc.returncode == 130:
                assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), context
            if run.proc.returncode == -signal.SIGINT:  # arrived during interpreter shutdown, after the command returned
                _assert_complete(out, source, run.resumable)
            assert not _tmp_dirs(tmp_path, run.name), context  # cleaned up on the way out
        if run.proc.returncode == 0 or run.overwrite:  # an overwritten output is never missing
            _assert_complete(out, source, run.resumable and run.proc.returncode == 0)
        elif out.exists():  # killed after the final rename
            _assert_complete(out, source, run.resumable)
    assert tree_hashes(source) == before, why
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        ["src", *(r.name for r in runs if (tmp_path / r.name).exists())]
    ), why
    assert any(r.signalled and r.saw_tmp for r in runs), f"no run was interrupted while writing {summary} {why}"

    # the next run writing the same --out removes what SIGKILLed runs left, and succeeds
    for run in runs:
        out = tmp_path / run.name
        result = CliRunner().invoke(main, ["extrapolate", str(source), *ARGS, "--out", str(out), "--overwrite"])
        assert result.exit_code == 0, result.output
        _assert_complete(out, source, resumable=False)
        assert not _tmp_dirs(tmp_path, run.name), f"{run.name}: stale temporary folders remain {why}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], why


# ---------------------------------------------------------------------- AtomicOutputDir, in-process


def test_failure_inside_leaves_nothing_not_even_created_parents(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), AtomicOutputDir(final) as tmp:
        write_json(tmp / "x.json", {"x": 1})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_os_error_while_writing_becomes_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="could not finish writing"), AtomicOutputDir(tmp_path / "out") as tmp:
        (tmp / "missing" / "x").write_text("x")  # FileNotFoundError
    assert list(tmp_path.iterdir()) == []


def test_overwrite_swaps_atomically_and_keeps_old_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), AtomicOutputDir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old.txt"] and len(list(tmp_path.iterdir())) == 1
    with AtomicOutputDir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and len(list(tmp_path.iterdir())) == 1


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    from nextoffline.io.writer import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{_host()}-{dead}-abc123"
    alive = tmp_path / f".out.tmp-{_host()}-{os.getpid()}-def456"  # a live writer: kept
    other = tmp_path / f".other.tmp-{_host()}-{dead}-abc123"  # another output: kept
    interrupted = tmp_path / f".out.old-{_host()}-{dead}-xyz789"  # killed between the two renames of an overwrite
    for folder in (stale, alive, other, interrupted / "previous"):
        folder.mkdir(parents=True)
    (interrupted / "previous" / "kept.txt").write_text("previous output")
    with pytest.raises(RuntimeError):  # "out" is missing: the previous output is restored first, and kept on failure
        with AtomicOutputDir(tmp_path / "out", overwrite=True):
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, other.name])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept.txt"]
    shutil.rmtree(alive)
