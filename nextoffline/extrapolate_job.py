"""The whole ``extrapolate`` job: check the output, extrapolate, optionally score, write.

Output layout with ``--eval-cmd``: ``OUT`` is the selected adapter (plus ``OUT/resume/`` with
``--resumable``), ``OUT/eval_logs/`` holds every evaluator log, and ``--keep-all`` adds every
other candidate under ``OUT/candidates/<candidate>/``. Without it, one target writes ``OUT``
as the adapter and a sweep writes one subfolder per candidate. Coefficient 0, the latest real
checkpoint, is always scored as the reference, and it wins ties: an extrapolation is only
selected when it scores strictly better than not extrapolating.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nextoffline.artifacts import CANDIDATES_DIR, EVAL_LOG_DIR, write_manifest
from nextoffline.errors import UsageError
from nextoffline.evaluation import EvalResult, EvalSpec, best_index, score_candidates, score_record, selection_text
from nextoffline.forecasting import ForecastOptions
from nextoffline.io.writer import check_output_location
from nextoffline.output import build_manifest, candidate_labels, candidate_record, output_sources, save_extrapolation, source_record
from nextoffline.pipeline import Extrapolation, RunSettings, extrapolate
from nextoffline.types import ResumeInfo, Trajectory

__all__ = ["ExtrapolateOutcome", "ExtrapolateRequest", "run_extrapolate"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtrapolateRequest:
    """What the user asked ``extrapolate`` for.

    Attributes:
        out_dir: output folder (created atomically).
        method: ``auto`` or a predictor name (``NAME@W`` sets a window).
        coefs: coefficients in horizons (0 = the latest checkpoint).
        to_steps: target steps.
        rank_policy: ``keep`` (rank r, resumable) or ``grow`` (rank r+1 exactly).
        holdout: checkpoints held out by the ``auto`` backtest.
        resumable: also write the trainer's own layout under ``OUT/resume/``.
        overwrite: replace a non-empty ``out_dir``.
        evaluation: score the candidates with a user command and keep the best.
        command: the command line, for provenance.
        forecast: how ``auto`` validates its choice (rolling origins, time axes, damping, NExt budget).
    """

    out_dir: Path
    method: str = "auto"
    coefs: Sequence[float] = ()
    to_steps: Sequence[float] = ()
    rank_policy: str = "keep"
    holdout: int = 2
    resumable: bool = False
    overwrite: bool = False
    evaluation: EvalSpec | None = None
    command: str = ""
    forecast: ForecastOptions | None = None


@dataclass(frozen=True)
class ExtrapolateOutcome:
    """What the job wrote.

    Attributes:
        out_dir: the output folder.
        extrapolation: the pipeline's result, with the evaluator's verdict in its note.
        labels: candidate folder names, in candidate order.
        resume: the resumable checkpoint written, if any.
        scores: per candidate index, the evaluation record (label, score, log, selected, adapter).
        selected: index of the selected candidate (with an evaluator).
        keep_all: every candidate was kept (``--keep-all``).
    """

    out_dir: Path
    extrapolation: Extrapolation
    labels: list[str]
    resume: ResumeInfo | None = None
    scores: dict[int, dict[str, Any]] = field(default_factory=dict)
    selected: int | None = None
    keep_all: bool = False


def _unique(values: Sequence[float]) -> list[float]:
    seen: list[float] = []
    for value in values:
        if not any(math.isclose(value, other, rel_tol=0, abs_tol=1e-12) for other in seen):
            seen.append(float(value))
    return seen


def run_extrapolate(trajectory: Trajectory, settings: RunSettings, request: ExtrapolateRequest) -> ExtrapolateOutcome:
    """Check the output location, extrapolate, optionally score candidates, write the output."""
    coefs, to_steps = _unique(request.coefs), _unique(request.to_steps)
    spec = request.evaluation
    if spec is not None and not any(c == 0 for c in coefs):
        coefs = [0.0, *coefs]  # the reference: no extrapolation
    if request.resumable and spec is None and len(coefs) + len(to_steps) > 1:
        raise UsageError("--resumable needs one target, or --eval-cmd to pick the best candidate")
    check_output_location(request.out_dir, sources=output_sources(trajectory), overwrite=request.overwrite)
    result = extrapolate(
        trajectory,
        settings,
        method=request.method,
        coefs=coefs,
        to_steps=to_steps,
        rank_policy=request.rank_policy,
        holdout=request.holdout,
        forecast=request.forecast,
    )
    labels = candidate_labels(result)
    if spec is None:
        out, resume = _save(trajectory, result, request)
        return ExtrapolateOutcome(out, result, labels, resume)
    return _evaluate_and_save(trajectory, result, labels, request, spec)


def _evaluate_and_save(
    trajectory: Trajectory, result: Extrapolation, labels: list[str], request: ExtrapolateRequest, spec: EvalSpec
) -> ExtrapolateOutcome:
    out_dir = request.out_dir
    source = source_record(trajectory)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.eval-", dir=out_dir.parent))  # same filesystem as OUT
    log_dir = Path(tempfile.mkdtemp(prefix="nextoffline-eval-logs-"))  # survives a failure, for the message's log path
    keep_dir = work / CANDIDATES_DIR if spec.keep_all else None
    try:
        results = score_candidates(
            trajectory, result, spec, log_dir, staging_dir=work / "staging", keep_dir=keep_dir, command=request.command, source=source
        )
        best = best_index([r.score for r in results], spec.lower_is_better)
        scores = {i: _score_record(r, i == best, spec.keep_all) for i, r in enumerate(results)}
        result = replace(result, note=_selection_note(result, results, best, spec))
        extra_dirs = {EVAL_LOG_DIR: log_dir}
        if keep_dir is not None:
            shutil.rmtree(keep_dir / labels[best], ignore_errors=True)  # the selected one is OUT itself
            _finish_kept(keep_dir, result, scores, request.command, source, best, spec)
            if any(keep_dir.iterdir()):
                extra_dirs[CANDIDATES_DIR] = keep_dir
        out, resume = _save(
            trajectory,
            result,
            request,
            scores=scores,
            keep=[best],
            extra_dirs=extra_dirs,
            lower_is_better=spec.lower_is_better,
            source=source,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)  # only on success: a failure message points into it
    return ExtrapolateOutcome(out, result, labels, resume, scores, best, spec.keep_all)


def _save(trajectory: Trajectory, result: Extrapolation, request: ExtrapolateRequest, **scored: Any) -> tuple[Path, ResumeInfo | None]:
    """Write the output (its location was checked before the work)."""
    return save_extrapolation(
        request.out_dir,
        trajectory,
        result,
        command=request.command,
        resumable=request.resumable,
        overwrite=request.overwrite,
        location_checked=True,
        **scored,
    )


def _score_record(result: EvalResult, selected: bool, keep_all: bool) -> dict[str, Any]:
    return score_record(result, selected, keep_all, log_dir=EVAL_LOG_DIR, candidates_dir=CANDIDATES_DIR)


def _selection_note(result: Extrapolation, results: list[EvalResult], best: int, spec: EvalSpec) -> str:
    """The extrapolation's note, plus a plain statement of what the evaluator selected."""
    text = selection_text([c.coef for c in result.candidates], results, best, spec)
    return f"{result.note}; {text}" if result.note else text


def _finish_kept(
    keep_dir: Path,
    result: Extrapolation,
    scores: Mapping[int, Mapping[str, Any]],
    command: str,
    source: Mapping[str, Any],
    best: int,
    spec: EvalSpec,
) -> None:
    """Give every kept (not selected) candidate its final manifest and card."""
    records = [dict(candidate_record(c), **scores[i]) for i, c in enumerate(result.candidates)]
    for i, record in enumerate(records):
        folder = keep_dir / record["label"]
        if i == best or not folder.is_dir():
            continue
        own = dict(record, selected=False, note=f"not selected: {records[best]['label']} scored best")
        manifest = build_manifest(source, result, own, command=command, candidates=records, lower_is_better=spec.lower_is_better)
        write_manifest(folder, manifest)
