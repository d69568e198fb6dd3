"""``nextoffline report`` on a full-parameter run: the LoRA report's numbers, from the temporal Grams.

Everything the report draws for a full-parameter trajectory follows from one statistics pass
(:func:`~nextoffline.dense.pipeline.collect_stats`): per tensor the trajectory direction
``V = sum_i a_i g_i`` and coefficients ``c(t) = <g_t, V>`` (top eigenpair of the Gram), each
trend's curve ``c(last) + <D(t), V>`` (:func:`~nextoffline.ops.dense.trend_curve`), and the
backtest (:func:`~nextoffline.dense.pipeline.dense_backtest`). The result is the LoRA report's
:class:`~nextoffline.report.data.ReportData`, rendered by the same figures and Markdown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nextoffline.dense.layout import DenseTrajectory
from nextoffline.dense.pipeline import DenseStats, Rank1Energy, dense_inspect
from nextoffline.dense.select import check_method, dense_auto_candidates, dense_backtest
from nextoffline.errors import UsageError
from nextoffline.ops.dense import trend_curve
from nextoffline.ops.predictors.trajectory import rank1_from_gram
from nextoffline.pipeline import default_horizon, horizon_steps
from nextoffline.report.data import ModuleCurves, ReportData, backtest_or_note, read_extrapolation, report_grid, select_modules

__all__ = ["compute_dense_report"]

LOG = logging.getLogger(__name__)


def _curves(
    stats: DenseStats, steps: list[float], methods: Sequence[str], selected: list[str], grid: list[float]
) -> tuple[list[ModuleCurves], dict[str, str]]:
    """Coefficients of the selected tensors and every trend's curve on ``grid`` (Gram arithmetic only)."""
    rows = [stats.keys.index(name) for name in selected]
    grams = stats.grams[rows]
    rank1 = rank1_from_gram(grams)
    curves = [
        ModuleCurves(name, steps, rank1.coefficients[j].tolist(), float(rank1.explained[j]), grid, {}) for j, name in enumerate(selected)
    ]
    failures: dict[str, str] = {}
    for method in methods:
        if method.partition("@")[0] == "next":
            failures[method] = (
                "not drawn for full-parameter runs: NExt predicts one update from the last checkpoint per tensor, not a curve; "
                "`backtest --methods next` scores it"
            )
            continue
        try:
            regressor, window = check_method(method)
        except UsageError as exc:
            failures[method] = str(exc)
            continue
        if window is not None and window > len(steps):
            failures[method] = f"window {window} is longer than the {len(steps)} checkpoints"
            continue
        values = trend_curve(grams, steps, rank1.weights, grid, regressor=regressor, window=window)
        for j, curve in enumerate(curves):
            base = curve.coefficients[-1]
            curve.predictions[method] = [base + float(v) for v in values[j]]
    return curves, failures


def compute_dense_report(
    trajectory: DenseTrajectory,
    stats: DenseStats,
    rank1: Rank1Energy | None,
    *,
    methods: Sequence[str],
    backtest_methods: Sequence[str] | None = None,
    holdout: int = 2,
    horizon: int | None = None,
    module_pattern: str | None = None,
    max_modules: int = 9,
    end_step: float | None = None,
    extrapolation_dir: Path | None = None,
) -> ReportData:
    """Every number of the report of a full-parameter trajectory (no plotting; tensors play the modules' part)."""
    extrapolation = read_extrapolation(extrapolation_dir) if extrapolation_dir is not None else None
    k = len(trajectory.checkpoints)
    horizon = horizon or default_horizon(k)
    span = horizon_steps(trajectory, horizon)  # type: ignore[arg-type]
    steps = [float(s) for s in trajectory.step_numbers]
    last = steps[-1]
    notes: list[str] = []
    if end_step is None:
        end_step = last + 2 * span
        if extrapolation:
            end_step = max([end_step, *(float(c["step"]) for c in extrapolation.candidates if c.get("step") is not None)])
    elif end_step <= last:
        raise UsageError(f"--to-step {end_step:g}: must be after the last checkpoint (step {trajectory.step_numbers[-1]})")
    if extrapolation and extrapolation.manifest.source.get("steps") not in (None, trajectory.step_numbers):
        notes.append(
            f"the extrapolation in {extrapolation.folder} was made from steps {extrapolation.manifest.source['steps']}, "
            f"not from this trajectory's steps {trajectory.step_numbers}"
        )
    inspect = dense_inspect(trajectory, stats, rank1)
    for row in inspect["per_step"]:
        row.setdefault("local_rank1_energy", None)  # only the global deltas' rank-1 energy is measured on dense runs
    result, backtest_note = backtest_or_note(
        k, holdout, lambda: dense_backtest(trajectory, stats, list(backtest_methods or dense_auto_candidates(k - holdout)), holdout=holdout)
    )
    grid = report_grid(steps, end_step)
    selected = select_modules(stats.keys, pattern=module_pattern, limit=max_modules)
    curves, failures = _curves(stats, steps, methods, selected, grid)
    everything = rank1_from_gram(stats.grams)
    coefficients = everything.coefficients
    normalised = [[float(c) / float(row[-1]) if float(row[-1]) else 0.0 for c in row] for row in coefficients]
    return ReportData(
        inspect=inspect,
        horizon=horizon,
        horizon_steps=span,
        end_step=end_step,
        methods=list(methods),
        method_failures=failures,
        modules=curves,
        all_names=list(stats.keys),
        all_normalised=normalised,
        all_explained=everything.explained.tolist(),
        backtest=result,
        backtest_note=backtest_note,
        extrapolation=extrapolation,
        notes=notes,
    )
