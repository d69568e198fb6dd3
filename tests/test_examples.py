"""The runnable examples run: the Python API walk-through and the tiny GRPO example's --quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def test_python_api_example(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "best predictor: power" in proc.stdout and (tmp_path / "extrapolated" / "adapter_model.safetensors").is_file()
    manifest = json.loads((tmp_path / "extrapolated" / "nextoffline.json").read_text())
    assert manifest["selected"]["step"] == 120


@pytest.mark.slow
def test_tiny_grpo_addition_quick(tmp_path: Path) -> None:
    """SFT -> TRL GRPO + LoRA -> eval-scored resumable sweep -> two resumed runs -> a run with the in-run callback."""
    pytest.importorskip("trl")
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tiny_grpo_addition" / "run.py"), "--quick", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((work / "results.json").read_text())
    (seed,) = results["seeds"]
    t1, total = results["t1"], results["t_total"]
    assert [c["coef"] for c in seed["candidates"]] == [0.0, 1.0, 2.0]  # coefficient 0 is always scored
    scores = [c["score"] for c in seed["candidates"]]
    assert seed["selected"]["score"] == max(scores) and all(0 <= s <= 1 for s in scores)
    assert set(seed["accuracy"]["baseline"]) == set(seed["accuracy"]["extrapolated_continued"]) >= {str(total)}
    assert [h["step"] for h in seed["reward"]["extrapolated_continued"]] == list(range(t1 + 1, total + 1))
    resumed = work / "seed_0" / "extrapolated" / "resume" / f"checkpoint-{t1}"
    assert (resumed / "optimizer.pt").is_file() and (work / "seed_0" / "extrapolated_continued" / f"checkpoint-{total}").is_dir()
    assert "| **baseline**" in (work / "results.md").read_text()
    assert (work / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (jump,) = seed["loop"]["jump_once"]["jumps"]  # the in-run callback jumped once, at t1, and training went on to the end
    assert jump["step"] == t1 and jump["applied"] and jump["method"] == "linear"
    assert str(total) in seed["loop"]["jump_once"]["accuracy"] and str(t1) in seed["loop"]["jump_once"]["after_jump"]
    assert (work / "seed_0" / "jump_once" / "nextoffline" / f"step_{t1}" / "adapter_model.safetensors").is_file()
    assert (work / "results_loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
