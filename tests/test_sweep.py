"""Candidate sweeps scored by ``--eval-cmd``: selection, reference, logs, failures, layouts."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.artifacts import read_manifest
from nextoffline.cli import main
from nextoffline.errors import UsageError
from nextoffline.evaluation import EvalSpec, best_index, parse_score
from nextoffline.synthetic import SyntheticSpec, synthetic_factors, write_synthetic_trajectory
from tests.conftest import make_trajectory

MODULE = "model.layers.0.self_attn.q_proj"
KEY = f"base_model.model.{MODULE}"
SCALE = 8 / 4  # lora_alpha / r of the synthetic spec

# Loads the candidate with safetensors and scores how close |dW| of one module is to a target
# norm: with a linear law and the linear predictor the candidate at step t has |dW| = t |dW_1|,
# so the best candidate is known in advance.
EVALUATOR = f"""
import sys, os
import numpy as np
from safetensors.numpy import load_file  # numpy, not torch: a fast evaluator keeps the tests fast
adapter, target, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
delta = {SCALE} * tensors["{KEY}.lora_B.weight"].astype(np.float64) @ tensors["{KEY}.lora_A.weight"].astype(np.float64)
norm = float(np.linalg.norm(delta))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt"), "a") as f:
    f.write(os.environ.get("NEXTOFFLINE_CANDIDATE", "?") + "\\n")
print("evaluating", adapter)
print("distance", abs(norm - target), file=sys.stderr)
print("score:", -abs(norm - target) if mode == "neg" else abs(norm - target))
"""


def run_cli(*args: object) -> tuple[int, str]:
    """Exit code and stdout with ``--json`` (logs go to stderr), else stdout and stderr together."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout if "--json" in args and result.exit_code == 0 else result.output


def norm_at(step: float) -> float:
    """|dW| of MODULE at ``step`` under the linear law (B_t = t B0, fixed A0)."""
    b, a = synthetic_factors(SyntheticSpec(steps=[10], law="linear"), 1, 0)
    return float((SCALE * b @ a).norm()) * step


def written_norm(folder: Path) -> float:
    t = load_file(folder / "adapter_model.safetensors")
    return float((SCALE * t[f"{KEY}.lora_B.weight"].double() @ t[f"{KEY}.lora_A.weight"].double()).norm())


@pytest.fixture
def evaluator(tmp_path: Path) -> Path:
    path = tmp_path / "evaluator" / "score.py"
    path.parent.mkdir()
    path.write_text(EVALUATOR)
    return path


def eval_cmd(script: Path, target: float, mode: str = "neg") -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{adapter}} {target!r} {mode}"


def calls(script: Path) -> list[str]:
    path = script.parent / "calls.txt"
    return path.read_text().split() if path.exists() else []


def hidden_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# steps 10..80, horizon 3 checkpoints = 30 steps: coefficient c -> step 80 + 30 c
COEFS = "1,2,3"
BEST_COEF, BEST_STEP = 2.0, 140


def test_eval_sweep_selects_the_best_and_scores_the_reference(tmp_path: Path, linear_run: Path, evaluator: Path) -> None:
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        COEFS,
        "--method",
        "linear",
        "--out",
        out,
        "--eval-cmd",
        eval_cmd(evaluator, norm_at(BEST_STEP)),
        "--json",
        "-q",
    )
    assert code == 0, text
    summary = json.loads(text)
    assert summary["selected"]["coef"] == BEST_COEF and summary["selected"]["label"] == "coef_2"
    assert sorted(calls(evaluator)) == ["coef_0", "coef_1", "coef_2", "coef_3"]  # coefficient 0 was scored too

    manifest = json.loads((out / "nextoffline.json").read_text())
    listed = {c["coef"]: c for c in manifest["candidates"]}
    assert sorted(listed) == [0.0, 1.0, 2.0, 3.0]
    expected = {c: -abs(norm_at(80 + 30 * c) - norm_at(BEST_STEP)) for c in listed}
    for coef, entry in listed.items():
        assert entry["score"] == pytest.approx(expected[coef], rel=1e-4, abs=1e-4)
        assert entry["step"] == pytest.approx(80 + 30 * coef)
        assert (out / entry["eval_log"]).is_file() and "score:" in (out / entry["eval_log"]).read_text()
        assert entry["selected"] == (coef == BEST_COEF)
    assert max(listed.values(), key=lambda e: e["score"])["coef"] == manifest["selected"]["coef"] == BEST_COEF
    assert manifest["selected"]["score"] == listed[BEST_COEF]["score"]
    assert manifest["selected"]["eval_log"] == "eval_logs/coef_2.log"
    # only the selected adapter is written, and it is the best candidate
    assert [p.relative_to(out).as_posix() for p in out.rglob("adapter_model.safetensors")] == ["adapter_model.safetensors"]
    assert written_norm(out) == pytest.approx(norm_at(BEST_STEP), rel=1e-4)
    assert "coef 2" in (out / "README.md").read_text()
    assert hidden_leftovers(tmp_path) == []


def test_lower_is_better_flips_the_choice(tmp_path: Path, linear_run: Path, evaluator: Path) -> None:
    command = eval_cmd(evaluator, norm_at(BEST_STEP), mode="distance")
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        COEFS,
        "--method",
        "linear",
        "--out",
        tmp_path / "low",
        "--eval-cmd",
        command,
        "--eval-lower-is-better",
        "--json",
        "-q",
    )
    assert code == 0, text
    assert json.loads(text)["selected"]["coef"] == BEST_COEF
    # the same distances read as "higher is better" pick the farthest candidate: coefficient 0
    code, text = run_cli(
        "extrapolate", linear_run, "--coef", COEFS, "--method", "linear", "--out", tmp_path / "high", "--eval-cmd", command, "--json", "-q"
    )
    assert code == 0, text
    assert json.loads(text)["selected"]["coef"] == 0.0
    # the manifest records the direction (the report reads it from there)
    assert read_manifest(tmp_path / "low").lower_is_better is True
    assert read_manifest(tmp_path / "high").lower_is_better is False
    assert "lower is better" in (tmp_path / "low" / "README.md").read_text()


def test_to_step_list_is_swept_with_the_reference(tmp_path: Path, linear_run: Path, evaluator: Path) -> None:
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--to-step",
        "100,125,150",
        "--method",
        "linear",
        "--out",
        tmp_path / "out",
        "--eval-cmd",
        eval_cmd(evaluator, norm_at(125)),
        "--json",
        "-q",
    )
    assert code == 0, text
    summary = json.loads(text)
    assert [c["label"] for c in summary["candidates"]] == ["coef_0", "step_100", "step_125", "step_150"]
    assert summary["selected"]["step"] == 125
    manifest = json.loads((tmp_path / "out" / "nextoffline.json").read_text())
    assert [c["step"] for c in manifest["candidates"]] == [80, 100, 125, 150]


def test_tie_keeps_the_latest_checkpoint_and_says_so(tmp_path: Path, linear_run: Path) -> None:
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        "1,2",
        "--method",
        "linear",
        "--out",
        tmp_path / "out",
        "--eval-cmd",
        "echo 0.5 # {adapter}",
        "--json",
        "-q",
    )
    assert code == 0, text
    summary = json.loads(text)
    assert summary["selected"]["coef"] == 0 and "no extrapolation" in summary["note"]
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    latest = load_file(linear_run / "step_80" / "adapter_model.safetensors")
    assert all(torch.allclose(written[k].double(), latest[k].double(), atol=1e-6) for k in latest)
    assert "no extrapolation" in json.loads((tmp_path / "out" / "nextoffline.json").read_text())["extrapolation"]["note"]


def test_keep_all_writes_every_candidate(tmp_path: Path, linear_run: Path, evaluator: Path) -> None:
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        COEFS,
        "--method",
        "linear",
        "--out",
        out,
        "--eval-cmd",
        eval_cmd(evaluator, norm_at(BEST_STEP)),
        "--keep-all",
        "--json",
        "-q",
    )
    assert code == 0, text
    assert written_norm(out) == pytest.approx(norm_at(BEST_STEP), rel=1e-4)  # OUT is still the selected one
    others = sorted(p.name for p in (out / "candidates").iterdir())
    assert others == ["coef_0", "coef_1", "coef_3"]
    for name in others:
        coef = float(name.removeprefix("coef_"))
        assert written_norm(out / "candidates" / name) == pytest.approx(norm_at(80 + 30 * coef), rel=1e-4)
        own = json.loads((out / "candidates" / name / "nextoffline.json").read_text())
        assert own["selected"]["coef"] == coef and own["selected"]["selected"] is False and len(own["candidates"]) == 4
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert {c["label"]: c["adapter"] for c in manifest["candidates"]} == {
        "coef_0": "candidates/coef_0",
        "coef_1": "candidates/coef_1",
        "coef_2": ".",
        "coef_3": "candidates/coef_3",
    }
    assert all(c["written"] for c in json.loads(text)["candidates"])


def test_sweep_without_eval_writes_one_folder_per_candidate(tmp_path: Path, linear_run: Path) -> None:
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate", linear_run, "--coef", "0,1.5", "--to-step", "125", "--method", "linear", "--out", out, "--json", "-q"
    )
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["coef_0", "coef_1.5", "step_125"]
    for name, step in (("coef_0", 80), ("coef_1.5", 125), ("step_125", 125)):
        manifest = json.loads((out / name / "nextoffline.json").read_text())
        assert manifest["selected"]["step"] == pytest.approx(step) and "score" not in manifest["selected"]
        assert written_norm(out / name) == pytest.approx(norm_at(step), rel=1e-4)
    assert "selected" not in json.loads(text)


def test_resumable_sweep_writes_the_selected_candidate_in_the_trainer_layout(tmp_path: Path, evaluator: Path) -> None:
    run = tmp_path / "trl_run"
    write_synthetic_trajectory(run, SyntheticSpec(steps=list(range(10, 90, 10)), law="linear"), dir_pattern="checkpoint-{step}")
    for folder in run.iterdir():
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
        (folder / "optimizer.pt").write_bytes(b"opt")
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate",
        run,
        "--coef",
        COEFS,
        "--method",
        "linear",
        "--out",
        out,
        "--resumable",
        "--eval-cmd",
        eval_cmd(evaluator, norm_at(BEST_STEP)),
        "--json",
        "-q",
    )
    assert code == 0, text
    summary = json.loads(text)
    assert summary["selected"]["coef"] == BEST_COEF and summary["resume"]["checkpoint_dir"].endswith("checkpoint-80")
    resumed = out / "resume" / "checkpoint-80"
    assert written_norm(resumed) == pytest.approx(norm_at(BEST_STEP), rel=1e-4)
    assert (resumed / "optimizer.pt").read_bytes() == b"opt"


def test_unchanged_auto_result_is_evaluated_once(tmp_path: Path, evaluator: Path) -> None:
    run = make_trajectory(tmp_path / "run", law="constant", noise=0.5)
    code, text = run_cli(
        "extrapolate",
        run,
        "--coef",
        "1,2",
        "--method",
        "auto",
        "--next-epochs",
        "10",
        "--out",
        tmp_path / "out",
        "--eval-cmd",
        eval_cmd(evaluator, 1.0),
        "--json",
        "-q",
    )
    assert code == 0, text
    summary = json.loads(text)
    assert summary["method"] == "none" and calls(evaluator) == ["coef_0"]
    assert len({c["score"] for c in summary["candidates"]}) == 1 and summary["selected"]["coef"] == 0


# ------------------------------------------------------------------------------------- failures


def assert_failed(code: int, text: str, out: Path, *needles: str) -> None:
    assert code != 0
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for needle in needles:
        assert needle in lines[0], text
    assert not out.exists()
    assert hidden_leftovers(out.parent) == []


def log_path_of(message: str) -> Path:
    return Path(message.split("log: ", 1)[1].split(")", 1)[0].rstrip(";"))


def test_failing_evaluator_gives_one_line_and_writes_nothing(tmp_path: Path, linear_run: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text("import sys\nprint('loading')\nprint('CUDA out of memory', file=sys.stderr)\nsys.exit(3)\n")
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        "1",
        "--method",
        "linear",
        "--out",
        out,
        "--eval-cmd",
        f"{sys.executable} {script} {{adapter}}",
        "-q",
    )
    assert_failed(code, text, out, "exited with status 3", "coef_0", "CUDA out of memory", "log: ")
    log = log_path_of(text).read_text()
    assert "loading" in log and "CUDA out of memory" in log and "[exit 3" in log


def test_evaluator_printing_no_number(tmp_path: Path, linear_run: Path) -> None:
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate", linear_run, "--coef", "1", "--method", "linear", "--out", out, "--eval-cmd", "echo 0.3; echo done {adapter}", "-q"
    )
    assert_failed(code, text, out, "printed no number", "done", "log: ")


def test_evaluator_timeout_kills_the_whole_command(tmp_path: Path, linear_run: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "slow.py"
    script.write_text(
        f"import subprocess, time\np = subprocess.Popen(['sleep', '60'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(60)\n"
    )
    out = tmp_path / "out"
    started = time.monotonic()
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        "1",
        "--method",
        "linear",
        "--out",
        out,
        "--eval-cmd",
        f"{sys.executable} {script} {{adapter}} && echo 1",
        "--eval-timeout",
        "2",
        "-q",
    )
    assert time.monotonic() - started < 30
    assert_failed(code, text, out, "timed out after 2s", "--eval-timeout", "log: ")
    assert "timed out" in log_path_of(text).read_text()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the evaluator's child process survived the timeout"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_eval_command_needs_the_adapter_placeholder(tmp_path: Path, linear_run: Path) -> None:
    code, text = run_cli(
        "extrapolate", linear_run, "--coef", "1", "--method", "linear", "--out", tmp_path / "out", "--eval-cmd", "python eval.py", "-q"
    )
    assert code != 0 and "{adapter}" in text and not (tmp_path / "out").exists()
    with pytest.raises(UsageError):
        EvalSpec("python eval.py")


def test_resumable_sweep_without_eval_is_refused_before_any_work(tmp_path: Path, linear_run: Path) -> None:
    code, text = run_cli("extrapolate", linear_run, "--coef", "1,2", "--method", "linear", "--out", tmp_path / "out", "--resumable", "-q")
    assert code != 0 and "--eval-cmd" in text


# ------------------------------------------------------------------------------------ unit level


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5\n", 0.5),
        ("loading\naccuracy: 0.73\n\n", 0.73),
        ("-1e-3", -0.001),
        ("12 of 20 correct\n0.6  \n", 0.6),
        ("", None),
        ("done\n", None),
        ("nan\n", None),
        ("inf", None),
        ("0.5\ndone", None),
    ],
)
def test_parse_score(text: str, expected: float | None) -> None:
    assert parse_score(text) == expected


def test_best_index_prefers_the_first_on_ties() -> None:
    assert best_index([0.5, 0.7, 0.7]) == 1
    assert best_index([0.5, 0.5]) == 0
    assert best_index([0.5, 0.2, 0.9], lower_is_better=True) == 1
    assert best_index([0.3, 0.3, 0.1, 0.1], lower_is_better=True) == 2


def test_evaluator_environment(tmp_path: Path, linear_run: Path) -> None:
    out = tmp_path / "out"
    code, text = run_cli(
        "extrapolate",
        linear_run,
        "--coef",
        "1",
        "--method",
        "linear",
        "--out",
        out,
        "--eval-cmd",
        'test "$NEXTOFFLINE_ADAPTER" = {adapter} && echo "$NEXTOFFLINE_CANDIDATE $NEXTOFFLINE_STEP $NEXTOFFLINE_COEF"',
        "--json",
        "-q",
    )
    assert code == 0, text
    assert [c["score"] for c in json.loads(text)["candidates"]] == [0.0, 1.0]
    assert "coef_1 110 1" in (out / "eval_logs" / "coef_1.log").read_text()
    assert os.path.basename(json.loads(text)["eval_logs"]) == "eval_logs"


@pytest.mark.parametrize("flag", ["--keep-all", "--eval-lower-is-better"])
def test_eval_flags_need_an_eval_command(tmp_path: Path, linear_run: Path, flag: str) -> None:
    code, text = run_cli("extrapolate", linear_run, "--coef", "1", "--method", "linear", "--out", tmp_path / "out", flag, "-q")
    assert code != 0 and flag in text and "--eval-cmd" in text and not (tmp_path / "out").exists()
