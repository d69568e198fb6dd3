"""``--eval-cmd`` on full-parameter runs: score every candidate model folder, keep the best.

The candidates are written in one streamed pass into ``OUT/candidates/<label>/`` (inside the
atomic temporary output); coefficient 0, the latest checkpoint, is always among them as the
reference and wins ties, as for LoRA (:mod:`nextoffline.evaluation`). The user command runs on
each folder (``{adapter}`` is the model folder, loadable by ``AutoModelForCausalLM``); the
selected one becomes ``OUT`` itself, the others are dropped unless ``--keep-all``. Under
``torchrun`` only rank 0 evaluates, after every rank has written its tensors.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextoffline.artifacts import CANDIDATES_DIR, EVAL_LOG_DIR
from nextoffline.dense.select import DenseCandidate
from nextoffline.evaluation import EvalResult, EvalSpec, best_index, candidate_env, run_eval, score_record, selection_text

__all__ = ["DenseScores", "evaluate_candidates"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseScores:
    """Per candidate (candidate order) its score record, the selected index and the selection note."""

    records: list[dict[str, Any]]
    best: int
    note: str


def evaluate_candidates(tmp: Path, candidates: Sequence[DenseCandidate], spec: EvalSpec, log_dir: Path, *, unchanged: bool) -> DenseScores:
    """Run the evaluator on ``tmp/candidates/<label>`` for every candidate, move the best to ``tmp``.

    ``unchanged``: every candidate is the latest checkpoint (nothing beat stopping), so the
    evaluator runs once and its score is reused.
    """
    results: list[EvalResult] = []
    for candidate in candidates:
        folder = tmp / CANDIDATES_DIR / candidate.label
        if unchanged and results:
            LOG.info(
                "candidate %s is the unchanged latest checkpoint, like %s: score %g reused",
                candidate.label,
                results[0].label,
                results[0].score,
            )
            results.append(EvalResult(candidate.label, results[0].score, 0.0, results[0].log))
            continue
        LOG.info("evaluating candidate %s (coefficient %g, step %g)", candidate.label, candidate.coef, candidate.target_step)
        env = candidate_env(candidate.coef, candidate.target_step, candidate.label)
        results.append(run_eval(spec, folder, log_dir / f"{candidate.label}.log", env=env))
        LOG.info("candidate %s scored %g (%.1fs)", candidate.label, results[-1].score, results[-1].seconds)
    best = best_index([r.score for r in results], spec.lower_is_better)
    records = [
        score_record(r, i == best, spec.keep_all, log_dir=EVAL_LOG_DIR, candidates_dir=CANDIDATES_DIR) for i, r in enumerate(results)
    ]
    _promote(tmp, candidates[best].label)
    if not spec.keep_all:
        shutil.rmtree(tmp / CANDIDATES_DIR)
    elif not any((tmp / CANDIDATES_DIR).iterdir()):
        (tmp / CANDIDATES_DIR).rmdir()
    note = selection_text([c.coef for c in candidates], results, best, spec)
    return DenseScores(records, best, note)


def _promote(tmp: Path, label: str) -> None:
    """Move the selected candidate's files up into the output folder itself (same filesystem)."""
    folder = tmp / CANDIDATES_DIR / label
    for child in sorted(folder.iterdir()):
        os.replace(child, tmp / child.name)
    folder.rmdir()
