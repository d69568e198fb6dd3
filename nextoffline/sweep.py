"""Candidate sweeps scored by a user command, and the whole ``extrapolate`` job.

Each candidate adapter is staged in a temporary folder, the user's ``--eval-cmd`` runs on it
(``{adapter}`` replaced by the folder), and the number on the last line of its output is the
score. Coefficient 0, the latest real checkpoint, is always scored as the reference.
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nextoffline.errors import EvaluationError, UsageError
from nextoffline.output import candidate_label, save_extrapolation, write_adapter_folder
from nextoffline.pipeline import Extrapolation, RunSettings, extrapolate
from nextoffline.types import Trajectory

__all__ = ["EvalSpec", "score_candidates", "run_extrapolate", "parse_score"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSpec:
    """How candidates are scored."""

    command: str
    lower_is_better: bool = False
    timeout: float = 3600.0
    keep_all: bool = False


def parse_score(output: str) -> float | None:
    """The number on the last non-empty line of ``output`` (``None`` if it is not a number)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = float(lines[-1].split()[-1])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _run_eval(spec: EvalSpec, adapter: Path, log_path: Path) -> float:
    command = spec.command.replace("{adapter}", shlex.quote(str(adapter)))
    try:
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=spec.timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        log_path.write_text(f"$ {command}\n[timed out after {spec.timeout:g}s]\n{exc.stdout or ''}{exc.stderr or ''}")
        raise EvaluationError(f"--eval-cmd timed out after {spec.timeout:g}s on {adapter.name} (log: {log_path}); raise --eval-timeout") from None
    log_path.write_text(f"$ {command}\n[exit {proc.returncode}]\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise EvaluationError(f"--eval-cmd exited with {proc.returncode} on {adapter.name} (log: {log_path}); fix the evaluator")
    score = parse_score(proc.stdout)
    if score is None:
        raise EvaluationError(f"--eval-cmd printed no number on its last line for {adapter.name} (log: {log_path}); print the score last")
    return score


def score_candidates(trajectory: Trajectory, extrapolation: Extrapolation, spec: EvalSpec, log_dir: Path) -> list[float]:
    """Stage every candidate adapter, run the evaluator on it, return the scores (same order)."""
    if "{adapter}" not in spec.command:
        raise UsageError("--eval-cmd must contain {adapter}, replaced by each candidate's folder")
    scores = []
    staging = Path(tempfile.mkdtemp(prefix="nextoffline-eval-"))
    try:
        for candidate in extrapolation.candidates:
            label = candidate_label(candidate)
            folder = staging / label
            write_adapter_folder(folder, trajectory, extrapolation, candidate, {"staged": True})
            scores.append(_run_eval(spec, folder, log_dir / f"{label}.log"))
            LOG.info("candidate %s scored %g", label, scores[-1])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return scores


def _best_index(scores: Sequence[float], lower_is_better: bool) -> int:
    keyed = [(-s if lower_is_better else s, -i) for i, s in enumerate(scores)]
    return -max(keyed)[1]


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
    coefs = list(coefs)
    if evaluation is not None and 0.0 not in coefs:
        coefs = [0.0, *coefs]
    result = extrapolate(trajectory, settings, method=method, coefs=coefs, to_steps=to_steps, rank_policy=rank_policy, holdout=holdout)
    count = len(result.candidates)
    if resumable and count > 1 and evaluation is None:
        raise UsageError("--resumable needs one target, or --eval-cmd to pick the best candidate")
    scores_by_index: dict[int, dict[str, Any]] | None = None
    keep = None
    log_dir = Path(tempfile.mkdtemp(prefix="nextoffline-logs-")) if evaluation else None
    if evaluation is not None:
        scores = score_candidates(trajectory, result, evaluation, log_dir)
        best = _best_index(scores, evaluation.lower_is_better)
        keep = list(range(count)) if evaluation.keep_all and not resumable else [best]
        scores_by_index = {i: {"score": s, "eval_log": f"eval_logs/{candidate_label(c)}.log"} for i, (s, c) in enumerate(zip(scores, result.candidates))}
    out, resume = save_extrapolation(out_dir, trajectory, result, command=command, resumable=resumable, overwrite=overwrite,
                                     scores=scores_by_index, keep=keep, extra_dirs={"eval_logs": log_dir} if log_dir else None)
    if log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    return _summary(out, result, keep, scores_by_index, resume)


def _summary(out: Path, result: Extrapolation, keep, scores, resume) -> dict[str, Any]:
    kept = keep if keep is not None else list(range(len(result.candidates)))
    candidates = []
    for i, c in enumerate(result.candidates):
        entry = {"step": c.target_step, "coef": c.coef, "kept_energy": c.kept_energy_mean, "relative_update": c.relative_update}
        entry.update((scores or {}).get(i, {}))
        entry["written"] = i in kept
        candidates.append(entry)
    summary: dict[str, Any] = {
        "out": str(out),
        "method": result.method,
        "note": result.note,
        "horizon_steps": result.horizon_steps,
        "candidates": candidates,
        "backtest": result.backtest.to_json() if result.backtest else None,
    }
    if scores:
        summary["selected"] = candidates[kept[0]] if len(kept) == 1 else None
    if resume is not None:
        summary["resume"] = {"checkpoint_dir": str(resume.checkpoint_dir), "command": resume.command, "notes": list(resume.notes)}
    return summary
