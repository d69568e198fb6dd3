"""Evaluation of candidate adapters by a user command: the spec, the subprocess, the scores.

Each candidate adapter is staged in a hidden folder next to ``--out``, the user's
``--eval-cmd`` runs on it (``{adapter}`` replaced by the folder), and the number on the last
non-empty line of its standard output is the score (higher is better unless
``--eval-lower-is-better``). Coefficient 0, the latest real checkpoint, is always scored as
the reference, and it wins ties: an extrapolation is only selected when it scores strictly
better than not extrapolating.

The evaluator also sees ``NEXTOFFLINE_ADAPTER``, ``NEXTOFFLINE_COEF``, ``NEXTOFFLINE_STEP``
and ``NEXTOFFLINE_CANDIDATE`` in its environment. Its stdout and stderr are kept in
``OUT/eval_logs/<candidate>.log``. The ``extrapolate`` job (:mod:`nextoffline.extrapolate_job`)
decides what is written where.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextoffline.errors import EvaluationError, UsageError
from nextoffline.output import build_manifest, candidate_labels, candidate_record, source_record, write_adapter_folder
from nextoffline.pipeline import Extrapolation
from nextoffline.types import Trajectory

__all__ = [
    "EvalResult",
    "EvalSpec",
    "best_index",
    "candidate_env",
    "parse_score",
    "run_eval",
    "score_candidates",
    "score_record",
    "selection_text",
]

LOG = logging.getLogger(__name__)

#: Seconds a timed-out evaluator gets between SIGTERM and SIGKILL.
_KILL_GRACE = 5.0


@dataclass(frozen=True)
class EvalSpec:
    """How candidates are scored.

    Attributes:
        command: shell command containing ``{adapter}``; prints the score on its last line.
        lower_is_better: smaller scores win (a loss, an error rate).
        timeout: seconds allowed per candidate.
        keep_all: also write the candidates that were not selected (``OUT/candidates/``).
    """

    command: str
    lower_is_better: bool = False
    timeout: float = 3600.0
    keep_all: bool = False

    def __post_init__(self) -> None:
        if "{adapter}" not in self.command:
            raise UsageError(
                "--eval-cmd must contain {adapter}, replaced by each candidate's adapter folder, e.g. "
                "--eval-cmd 'python eval.py --adapter {adapter}'"
            )
        if not self.timeout > 0:
            raise UsageError(f"--eval-timeout {self.timeout:g}: must be positive")


@dataclass(frozen=True)
class EvalResult:
    """The score of one candidate and where its log was kept."""

    label: str
    score: float
    seconds: float
    log: Path


def parse_score(output: str) -> float | None:
    """The number on the last non-empty line of ``output`` (``None`` if it is not a finite number).

    The line may carry a label (``accuracy: 0.73``): its last whitespace-separated word is read.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = float(lines[-1].split()[-1])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the evaluator and everything it started (it runs in its own process group)."""
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def run_eval(spec: EvalSpec, adapter: Path, log_path: Path, *, env: Mapping[str, str] | None = None) -> EvalResult:
    """Run the evaluator on one adapter folder; keep its output in ``log_path``; return its score.

    Raises:
        EvaluationError: the command timed out, exited non-zero, or printed no number last.
    """
    command = spec.command.replace("{adapter}", shlex.quote(str(adapter)))
    label = adapter.name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_path.with_suffix(".stdout.tmp"), log_path.with_suffix(".stderr.tmp")
    full_env = {**os.environ, **(env or {}), "NEXTOFFLINE_ADAPTER": str(adapter)}
    started = time.monotonic()
    timed_out = False
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        proc = subprocess.Popen(
            command, shell=True, stdout=out_file, stderr=err_file, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True
        )
        try:
            proc.wait(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # KeyboardInterrupt: never leave the evaluator running
            _kill_group(proc)
            raise
    seconds = time.monotonic() - started
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    score = None if timed_out or proc.returncode != 0 else parse_score(stdout)
    status = f"timed out after {spec.timeout:g}s" if timed_out else f"exit {proc.returncode}"
    log_path.write_text(
        f"$ {command}\n[{status}; {seconds:.1f}s; score {score if score is not None else 'none'}]\n"
        f"--- stdout\n{stdout}--- stderr\n{stderr}",
        encoding="utf-8",
    )
    if timed_out:
        raise EvaluationError(
            f"--eval-cmd timed out after {spec.timeout:g}s on candidate {label} (log: {log_path}); "
            "raise --eval-timeout or make the evaluator faster"
        )
    if proc.returncode != 0:
        why = _last_line(stderr) or _last_line(stdout) or "no output"
        raise EvaluationError(f"--eval-cmd exited with status {proc.returncode} on candidate {label}: {why} (log: {log_path})")
    if score is None:
        last = _last_line(stdout)
        shown = f"its last line was {last!r}" if last else "it printed nothing on stdout"
        raise EvaluationError(
            f"--eval-cmd printed no number on its last line for candidate {label} ({shown}; log: {log_path}); "
            "make the evaluator print the score as the last line of stdout"
        )
    return EvalResult(label, score, seconds, log_path)


def candidate_env(coef: float, step: float, label: str) -> dict[str, str]:
    """The evaluator's environment for one candidate (besides ``NEXTOFFLINE_ADAPTER``)."""
    return {"NEXTOFFLINE_COEF": f"{coef:g}", "NEXTOFFLINE_STEP": f"{step:g}", "NEXTOFFLINE_CANDIDATE": label}


def score_candidates(
    trajectory: Trajectory,
    extrapolation: Extrapolation,
    spec: EvalSpec,
    log_dir: Path,
    *,
    staging_dir: Path | None = None,
    keep_dir: Path | None = None,
    command: str = "",
    source: Mapping[str, Any] | None = None,
) -> list[EvalResult]:
    """Stage every candidate adapter, run the evaluator on it, return the results (same order).

    Candidates are staged one at a time in ``staging_dir`` (default: a temporary folder) and
    deleted after scoring, or moved to ``keep_dir/<label>`` when given. When the extrapolation
    left the weights unchanged (``method == "none"``) every candidate is the latest checkpoint
    and the evaluator runs once.
    """
    labels = candidate_labels(extrapolation)
    if len(set(labels)) != len(labels):
        raise UsageError(f"candidates {labels} share a name; give each coefficient/step once")
    source = source if source is not None else source_record(trajectory)
    own_staging = staging_dir is None
    staging = Path(tempfile.mkdtemp(prefix="nextoffline-eval-")) if own_staging else staging_dir
    results: list[EvalResult] = []
    try:
        for candidate, label in zip(extrapolation.candidates, labels):
            folder = staging / label
            record = dict(candidate_record(candidate), label=label, staged_for_evaluation=True)
            manifest = build_manifest(source, extrapolation, record, command=command, lower_is_better=spec.lower_is_better)
            write_adapter_folder(folder, trajectory, extrapolation, candidate, manifest)
            if extrapolation.method == "none" and results:
                first = results[0]
                LOG.info("candidate %s is the unchanged latest checkpoint, like %s: score %g reused", label, first.label, first.score)
                results.append(EvalResult(label, first.score, 0.0, first.log))
            else:
                LOG.info("evaluating candidate %s (coefficient %g, step %g)", label, candidate.coef, candidate.target_step)
                results.append(
                    run_eval(spec, folder, log_dir / f"{label}.log", env=candidate_env(candidate.coef, candidate.target_step, label))
                )
                LOG.info("candidate %s scored %g (%.1fs)", label, results[-1].score, results[-1].seconds)
            if keep_dir is not None:
                keep_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), str(keep_dir / label))
            else:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if own_staging:
            shutil.rmtree(staging, ignore_errors=True)
    return results


def score_record(result: EvalResult, selected: bool, keep_all: bool, *, log_dir: str, candidates_dir: str) -> dict[str, Any]:
    """The manifest record of one scored candidate: its score, log, and where it was written
    (``"."``: the output folder itself; ``None``: dropped)."""
    return {
        "label": result.label,
        "score": result.score,
        "eval_log": f"{log_dir}/{result.log.name}",
        "eval_seconds": round(result.seconds, 3),
        "selected": selected,
        "adapter": "." if selected else (f"{candidates_dir}/{result.label}" if keep_all else None),
    }


def selection_text(coefs: Sequence[float], results: Sequence[EvalResult], best: int, spec: EvalSpec) -> str:
    """A plain statement of what the evaluator selected, against coefficient 0 (no extrapolation)."""
    reference = next((r.score for c, r in zip(coefs, results) if c == 0), None)
    direction = "lower" if spec.lower_is_better else "higher"
    if coefs[best] == 0:
        text = (
            f"the evaluator scored coefficient 0 (no extrapolation, score {reference:g}) best or tied ({direction} is better): "
            "the selected output is the latest checkpoint"
        )
        LOG.warning(text)
        return text
    return f"selected {results[best].label} (score {results[best].score:g} vs {reference:g} without extrapolation; {direction} is better)"


def best_index(scores: Sequence[float], lower_is_better: bool = False) -> int:
    """Index of the best score; ties go to the earliest candidate (coefficient 0 comes first)."""
    best = 0
    for i, score in enumerate(scores):
        if (score < scores[best]) if lower_is_better else (score > scores[best]):
            best = i
    return best
