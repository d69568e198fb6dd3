"""Candidate sweeps scored by a user command, and the whole ``extrapolate`` job.

Each candidate adapter is staged in a hidden folder next to ``--out``, the user's
``--eval-cmd`` runs on it (``{adapter}`` replaced by the folder), and the number on the last
non-empty line of its standard output is the score (higher is better unless
``--eval-lower-is-better``). Coefficient 0, the latest real checkpoint, is always scored as
the reference, and it wins ties: an extrapolation is only selected when it scores strictly
better than not extrapolating.

The evaluator also sees ``NEXTOFFLINE_ADAPTER``, ``NEXTOFFLINE_COEF``, ``NEXTOFFLINE_STEP``
and ``NEXTOFFLINE_CANDIDATE`` in its environment. Its stdout and stderr are kept in
``OUT/eval_logs/<candidate>.log``. Output layout with ``--eval-cmd``: ``OUT`` is the selected
adapter (plus ``OUT/resume/`` with ``--resumable``); ``--keep-all`` adds every other
candidate under ``OUT/candidates/<candidate>/``.
"""

from __future__ import annotations

import json
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

from nextoffline import __version__
from nextoffline.card import build_manifest, model_card
from nextoffline.errors import EvaluationError, UsageError
from nextoffline.io.writer import write_json, write_text
from nextoffline.output import (
    MANIFEST_NAME,
    candidate_label,
    candidate_record,
    extrapolation_record,
    save_extrapolation,
    source_record,
    write_adapter_folder,
)
from nextoffline.pipeline import Candidate, Extrapolation, RunSettings, extrapolate
from nextoffline.types import Trajectory

__all__ = ["CANDIDATES_DIR", "EVAL_LOG_DIR", "EvalResult", "EvalSpec", "parse_score", "run_eval", "run_extrapolate", "score_candidates"]

LOG = logging.getLogger(__name__)

EVAL_LOG_DIR = "eval_logs"
CANDIDATES_DIR = "candidates"
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


def _candidate_env(candidate: Candidate, label: str) -> dict[str, str]:
    return {"NEXTOFFLINE_COEF": f"{candidate.coef:g}", "NEXTOFFLINE_STEP": f"{candidate.target_step:g}", "NEXTOFFLINE_CANDIDATE": label}


def _manifest(
    trajectory: Trajectory,
    extrapolation: Extrapolation,
    record: Mapping[str, Any],
    command: str,
    source: Mapping[str, Any],
    candidates: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    return build_manifest(
        version=__version__,
        command=command,
        source=source,
        extrapolation=extrapolation_record(extrapolation),
        candidate=record,
        candidates=candidates,
    )


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
    labels: Sequence[str] | None = None,
) -> list[EvalResult]:
    """Stage every candidate adapter, run the evaluator on it, return the results (same order).

    Candidates are staged one at a time in ``staging_dir`` (default: a temporary folder) and
    deleted after scoring, or moved to ``keep_dir/<label>`` when given. When the extrapolation
    left the weights unchanged (``method == "none"``) every candidate is the latest checkpoint
    and the evaluator runs once.
    """
    labels = list(labels) if labels is not None else [candidate_label(c) for c in extrapolation.candidates]
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
            write_adapter_folder(
                folder, trajectory, extrapolation, candidate, _manifest(trajectory, extrapolation, record, command, source)
            )
            if extrapolation.method == "none" and results:
                first = results[0]
                LOG.info("candidate %s is the unchanged latest checkpoint, like %s: score %g reused", label, first.label, first.score)
                results.append(EvalResult(label, first.score, 0.0, first.log))
            else:
                LOG.info("evaluating candidate %s (coefficient %g, step %g)", label, candidate.coef, candidate.target_step)
                results.append(run_eval(spec, folder, log_dir / f"{label}.log", env=_candidate_env(candidate, label)))
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


def best_index(scores: Sequence[float], lower_is_better: bool = False) -> int:
    """Index of the best score; ties go to the earliest candidate (coefficient 0 comes first)."""
    best = 0
    for i, score in enumerate(scores):
        if (score < scores[best]) if lower_is_better else (score > scores[best]):
            best = i
    return best


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def target_labels(coefs: Sequence[float], to_steps: Sequence[float]) -> list[str]:
    """Candidate names in the order :func:`~nextoffline.pipeline.resolve_targets` builds them: ``coef_C`` then ``step_N``."""
    return [f"coef_{c:g}" for c in coefs] + [f"step_{_number(s)}" for s in to_steps]


def _unique(values: Sequence[float]) -> list[float]:
    seen: list[float] = []
    for value in values:
        if not any(math.isclose(value, other, rel_tol=0, abs_tol=1e-12) for other in seen):
            seen.append(float(value))
    return seen


def run_extrapolate(
    trajectory: Trajectory,
    settings: RunSettings,
    *,
    out_dir: Path,
    method: str,
    coefs: Sequence[float],
    to_steps: Sequence[float],
    rank_policy: str,
    holdout: int,
    resumable: bool,
    overwrite: bool,
    evaluation: EvalSpec | None,
    command: str,
) -> dict[str, Any]:
    """Extrapolate, optionally score candidates, write the output; return a JSON-able summary."""
    coefs, to_steps = _unique(coefs), _unique(to_steps)
    if evaluation is not None and not any(c == 0 for c in coefs):
        coefs = [0.0, *coefs]  # the reference: no extrapolation
    if resumable and evaluation is None and len(coefs) + len(to_steps) > 1:
        raise UsageError("--resumable needs one target, or --eval-cmd to pick the best candidate")
    labels = target_labels(coefs, to_steps)
    result = extrapolate(trajectory, settings, method=method, coefs=coefs, to_steps=to_steps, rank_policy=rank_policy, holdout=holdout)
    if evaluation is None:
        out, resume = save_extrapolation(
            out_dir, trajectory, result, command=command, resumable=resumable, overwrite=overwrite, labels=labels
        )
        return _summary(out, result, labels, None, None, resume)

    source = source_record(trajectory)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.eval-", dir=out_dir.parent))  # same filesystem as OUT
    log_dir = Path(tempfile.mkdtemp(prefix="nextoffline-eval-logs-"))  # survives a failure, for the message's log path
    keep_dir = work / CANDIDATES_DIR if evaluation.keep_all else None
    try:
        results = score_candidates(
            trajectory,
            result,
            evaluation,
            log_dir,
            staging_dir=work / "staging",
            keep_dir=keep_dir,
            command=command,
            source=source,
            labels=labels,
        )
        best = best_index([r.score for r in results], evaluation.lower_is_better)
        extras: dict[int, dict[str, Any]] = {}
        for i, r in enumerate(results):
            kept = i == best or evaluation.keep_all
            extras[i] = {
                "label": r.label,
                "score": r.score,
                "eval_log": f"{EVAL_LOG_DIR}/{r.log.name}",
                "eval_seconds": round(r.seconds, 3),
                "selected": i == best,
                "adapter": "." if i == best else (f"{CANDIDATES_DIR}/{r.label}" if kept else None),
            }
        _note_selection(result, results, best, evaluation)
        extra_dirs = {EVAL_LOG_DIR: log_dir}
        if keep_dir is not None:
            shutil.rmtree(keep_dir / labels[best], ignore_errors=True)  # the selected one is OUT itself
            _finish_kept(keep_dir, trajectory, result, extras, command, source, best)
            if any(keep_dir.iterdir()):
                extra_dirs[CANDIDATES_DIR] = keep_dir
        out, resume = save_extrapolation(
            out_dir,
            trajectory,
            result,
            command=command,
            resumable=resumable,
            overwrite=overwrite,
            scores=extras,
            keep=[best],
            extra_dirs=extra_dirs,
            labels=labels,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)  # only on success: a failure message points into it
    return _summary(out, result, labels, best, extras, resume, keep_all=evaluation.keep_all)


def _note_selection(result: Extrapolation, results: list[EvalResult], best: int, spec: EvalSpec) -> None:
    """Say plainly in the summary and manifest when not extrapolating scored best."""
    chosen = result.candidates[best]
    reference = next((r.score for c, r in zip(result.candidates, results) if c.coef == 0), None)
    direction = "lower" if spec.lower_is_better else "higher"
    if chosen.coef == 0:
        text = (
            f"the evaluator scored coefficient 0 (no extrapolation, score {reference:g}) best or tied ({direction} is better): "
            "the selected adapter is the latest checkpoint"
        )
        LOG.warning(text)
    else:
        text = (
            f"selected {results[best].label} (score {results[best].score:g} vs {reference:g} without extrapolation; {direction} is better)"
        )
    result.note = f"{result.note}; {text}" if result.note else text


def _finish_kept(
    keep_dir: Path,
    trajectory: Trajectory,
    result: Extrapolation,
    extras: Mapping[int, Mapping[str, Any]],
    command: str,
    source: Mapping[str, Any],
    best: int,
) -> None:
    """Give every kept (not selected) candidate its final manifest and card."""
    records = [dict(candidate_record(c), **extras[i]) for i, c in enumerate(result.candidates)]
    for i, record in enumerate(records):
        folder = keep_dir / record["label"]
        if i == best or not folder.is_dir():
            continue
        own = dict(record, selected=False, note=f"not selected: {records[best]['label']} scored best")
        manifest = _manifest(trajectory, result, own, command, source, candidates=records)
        write_json(folder / MANIFEST_NAME, manifest)
        write_text(folder / "README.md", model_card(manifest))


def _summary(
    out: Path,
    result: Extrapolation,
    labels: Sequence[str],
    best: int | None,
    extras: Mapping[int, Mapping[str, Any]] | None,
    resume,
    *,
    keep_all: bool = False,
) -> dict[str, Any]:
    candidates = []
    for i, c in enumerate(result.candidates):
        entry: dict[str, Any] = {
            "label": labels[i],
            "step": c.target_step,
            "coef": c.coef,
            "kept_energy": c.kept_energy_mean,
            "relative_update": c.relative_update,
        }
        if extras is not None:
            entry.update(extras[i])
            entry["written"] = i == best or keep_all
        else:
            entry["written"] = True
            entry["adapter"] = "." if len(result.candidates) == 1 else entry["label"]
        candidates.append(entry)
    summary: dict[str, Any] = {
        "out": str(out),
        "method": result.method,
        "note": result.note,
        "horizon_steps": result.horizon_steps,
        "candidates": candidates,
        "backtest": result.backtest.to_json() if result.backtest else None,
    }
    if best is not None:
        summary["selected"] = candidates[best]
        summary["eval_logs"] = str(out / EVAL_LOG_DIR)
    if resume is not None:
        summary["resume"] = {"checkpoint_dir": str(resume.checkpoint_dir), "command": resume.command, "notes": list(resume.notes)}
    return summary


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``nextoffline.json`` of an output folder (for reports and scripts)."""
    return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
