"""The numbers of the report, computed through the pipeline (no plotting).

:func:`compute_report` runs inspect and backtest, and streams the trajectory once
(:func:`~nextoffline.pipeline.stream_chunks`) for the trajectory rank-1 coefficients ``c(t)``
of every module while the predictors observe it, then once more over the chunks of the
modules drawn, for each predictor's curve.

Coefficient curves: for module ``j`` the trajectory direction ``V`` (top right singular vector
of its stacked updates over all checkpoints) gives ``c(t) = <dW_t, V>``. A predictor's curve is
``c(t_last) + <D(t), V>`` where ``D(t)`` is the update it would add to the latest checkpoint to
reach step ``t``, so every curve passes through the last checkpoint, exactly as
``extrapolate`` applies it, and predictors whose update leaves ``V`` (NExt) are drawn on the
same axis by their component along ``V``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextoffline.artifacts import MANIFEST_NAME, Manifest, read_manifest
from nextoffline.errors import UsageError
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.predictors import (
    FactoredUpdate,
    Predictor,
    auto_candidates,
    direction_component,
    parse_predictor_name,
    trajectory_rank1,
)
from nextoffline.pipeline import (
    BacktestResult,
    RunSettings,
    backtest,
    fit_all,
    horizon_steps,
    inspect_trajectory,
    make_predictors,
    observe,
    stream_chunks,
)
from nextoffline.types import Trajectory

__all__ = [
    "REPORT_METHODS",
    "ExtrapolationView",
    "ModuleCurves",
    "ReportData",
    "compute_report",
    "read_extrapolation",
    "select_modules",
    "short_name",
]

LOG = logging.getLogger(__name__)

#: Predictors drawn on the coefficient plots by default.
REPORT_METHODS = ("linear", "power", "poly", "gp", "next")
GRID_POINTS = 61


# ------------------------------------------------------------------------------------------- data


@dataclass
class ModuleCurves:
    """One module's trajectory coefficient and every predictor's curve on a step grid."""

    name: str
    steps: list[float]
    coefficients: list[float]
    explained: float
    grid: list[float]
    predictions: dict[str, list[float | None]]


@dataclass(frozen=True)
class ExtrapolationView:
    """Candidates and selection of an earlier ``extrapolate`` output, from its manifest(s)."""

    folder: str
    manifest: Manifest
    candidates: list[dict[str, Any]]
    selected: dict[str, Any] | None
    scored: bool

    @property
    def lower_is_better(self) -> bool:
        """How the evaluator's scores rank, as the manifest records it (higher is better when unrecorded)."""
        return bool(self.manifest.lower_is_better)

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "manifest": self.manifest.to_json(),
            "candidates": self.candidates,
            "selected": self.selected,
            "scored": self.scored,
            "lower_is_better": self.lower_is_better,
        }


@dataclass
class ReportData:
    """Everything the report shows, JSON-serialisable through :meth:`to_json`."""

    inspect: dict[str, Any]
    horizon: int
    horizon_steps: float
    end_step: float
    methods: list[str]
    method_failures: dict[str, str]
    modules: list[ModuleCurves]
    all_names: list[str]
    all_normalised: list[list[float]]
    all_explained: list[float]
    backtest: BacktestResult | None
    backtest_note: str = ""
    extrapolation: ExtrapolationView | None = None
    notes: list[str] = field(default_factory=list)

    def median_normalised(self) -> list[float]:
        """Per step, the median over modules of ``c(t) / c(last)``."""
        return torch.tensor(self.all_normalised, dtype=torch.float64).median(dim=0).values.tolist()

    def to_json(self) -> dict[str, Any]:
        return {
            "inspect": self.inspect,
            "horizon_checkpoints": self.horizon,
            "horizon_steps": self.horizon_steps,
            "end_step": self.end_step,
            "methods": self.methods,
            "method_failures": self.method_failures,
            "modules": [asdict(m) for m in self.modules],
            "all_modules": [
                {"name": n, "normalised_coefficients": c, "explained": e}
                for n, c, e in zip(self.all_names, self.all_normalised, self.all_explained)
            ],
            "backtest": self.backtest.to_json() if self.backtest else None,
            "backtest_note": self.backtest_note,
            "extrapolation": self.extrapolation.to_json() if self.extrapolation else None,
            "notes": self.notes,
        }


def short_name(module: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj``."""
    name = module.removeprefix("base_model.model.")
    return name.removeprefix("model.") if name.startswith("model.layers.") else name


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def report_grid(steps: Sequence[float], end_step: float) -> list[float]:
    """The curves' x values: :data:`GRID_POINTS` evenly spaced from the first step to ``end_step``, plus every step."""
    first = float(steps[0])
    return sorted({*(first + (end_step - first) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)), *map(float, steps)})


def backtest_or_note(k: int, holdout: int, run: Callable[[], BacktestResult]) -> tuple[BacktestResult | None, str]:
    """``run()`` when ``k`` checkpoints leave at least 3 to fit on, else ``None`` and the reason."""
    if k - holdout >= 3:
        return run(), ""
    return None, f"no backtest: {k} checkpoints leave {k - holdout} to fit on with holdout {holdout}; at least 3 are needed"


def select_modules(names: Sequence[str], *, pattern: str | None = None, limit: int = 9) -> list[str]:
    """Modules to draw: those matching ``pattern`` (regex search), spread evenly over the model, at most ``limit``."""
    ordered = sorted(names, key=_natural_key)
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--modules {pattern!r}: not a valid regular expression ({exc})") from None
        ordered = [n for n in ordered if regex.search(n)]
        if not ordered:
            raise UsageError(f"--modules {pattern!r} matches no LoRA module; e.g. {short_name(names[0])!r}")
    if len(ordered) <= limit:
        return ordered
    picks = sorted({round(i * (len(ordered) - 1) / (limit - 1)) for i in range(limit)}) if limit > 1 else [0]
    return [ordered[i] for i in picks]


def compute_curves(
    trajectory: Trajectory,
    settings: RunSettings,
    methods: Sequence[str],
    selected: Sequence[str],
    grid: Sequence[float],
    horizon: int,
) -> tuple[list[ModuleCurves], list[list[float]], list[float], list[str], dict[str, str]]:
    """Coefficient trajectories of every module and predictor curves of the ``selected`` ones.

    Trajectory (RELEX-style) predictors fit every module independently, so they are fitted on
    the selected modules only; NExt fits one network per shape group and sees every chunk.
    """
    wanted = set(selected)
    last_step = float(trajectory.step_numbers[-1])
    group_level = [m for m in methods if parse_predictor_name(m)[0] == "next"]
    per_module = [m for m in methods if m not in group_level]
    fitted = make_predictors(methods, settings, horizon)
    failures: dict[str, str] = {}
    all_names: list[str] = []
    all_normalised: list[list[float]] = []
    all_explained: list[float] = []
    curves: dict[str, ModuleCurves] = {}
    # pass 1 (one read of every factor): coefficients of every module, while the predictors observe
    for _plan, chunk in stream_chunks(trajectory, settings, "report"):
        rank1 = trajectory_rank1(chunk)
        coefficients = rank1.coefficients.cpu()
        for j, name in enumerate(chunk.names):
            last = float(coefficients[j, -1])
            all_names.append(name)
            all_normalised.append([float(c) / last if last else 0.0 for c in coefficients[j]])
            all_explained.append(float(rank1.explained[j]))
        for name in group_level:
            if name in fitted:
                observe(fitted, name, chunk, failures)
        index = [j for j, name in enumerate(chunk.names) if name in wanted]
        if index:
            sub = chunk.select_modules(index)
            for name in per_module:
                if name in fitted:
                    observe(fitted, name, sub, failures)
            for j in index:
                curves[chunk.names[j]] = ModuleCurves(
                    chunk.names[j], chunk.steps.tolist(), coefficients[j].tolist(), float(rank1.explained[j]), list(grid), {}
                )
    fit_all(fitted, settings)
    # pass 2, over the chunks of the selected modules: every predictor's curve
    for _plan, chunk in stream_chunks(trajectory, settings, "report", modules=wanted):
        index = [j for j, name in enumerate(chunk.names) if name in wanted]
        sub = chunk.select_modules(index)
        weights = trajectory_rank1(sub).weights
        for name, predictor in fitted.items():
            values = _curve_values(predictor, chunk, sub, index, weights, grid, full=name in group_level, last_step=last_step)
            for row, module in enumerate(sub.names):
                curve = curves[module]
                base = curve.coefficients[-1]
                curve.predictions[name] = [None if math.isnan(v) else base + v for v in values[row].tolist()]
    ordered = [curves[n] for n in selected if n in curves]
    return ordered, all_normalised, all_explained, all_names, failures


def _curve_values(
    predictor: Predictor,
    chunk: FactorChunk,
    sub: FactorChunk,
    index: list[int],
    weights: torch.Tensor,
    grid: Sequence[float],
    *,
    full: bool,
    last_step: float,
) -> torch.Tensor:
    """``<D(t), V>`` of the selected modules on the grid (NaN before the last checkpoint for
    predictors that only predict forward from it: NExt)."""
    values = torch.full((len(index), len(grid)), float("nan"), dtype=torch.float64)
    for g, step in enumerate(grid):
        if full and step < last_step:
            continue
        update = predictor.predict_update(chunk if full else sub, float(step))
        if full:
            update = FactoredUpdate(update.left[index], update.right[index])
        values[:, g] = direction_component(update, sub, weights).cpu()
    return values


def read_extrapolation(folder: Path) -> ExtrapolationView:
    """Candidates and selection of a previous ``extrapolate`` output (eval-scored or a plain sweep)."""
    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder)
        candidates = manifest.candidates or [manifest.selected]
        return ExtrapolationView(str(folder), manifest, candidates, manifest.selected, manifest.scored)
    subfolders = (
        sorted((p for p in folder.iterdir() if (p / MANIFEST_NAME).is_file()), key=lambda p: _natural_key(p.name))
        if folder.is_dir()
        else []
    )
    if not subfolders:
        raise UsageError(
            f"--extrapolation {folder}: no {MANIFEST_NAME} here or in its subfolders; pass the --out folder of `nextoffline extrapolate`"
        )
    manifests = [read_manifest(p) for p in subfolders]
    candidates = [dict(m.selected, label=m.selected.get("label", p.name), adapter=p.name) for p, m in zip(subfolders, manifests)]
    return ExtrapolationView(str(folder), manifests[0], candidates, None, False)


def compute_report(
    trajectory: Trajectory,
    settings: RunSettings,
    *,
    methods: Sequence[str] = REPORT_METHODS,
    backtest_methods: Sequence[str] | None = None,
    holdout: int = 2,
    module_pattern: str | None = None,
    max_modules: int = 9,
    end_step: float | None = None,
    extrapolation_dir: Path | None = None,
) -> ReportData:
    """Compute every number the report shows (no plotting)."""
    for name in [*methods, *(backtest_methods or [])]:
        parse_predictor_name(name)
    extrapolation = read_extrapolation(extrapolation_dir) if extrapolation_dir is not None else None
    k = len(trajectory.steps)
    horizon = settings.horizon_for(k)
    span = horizon_steps(trajectory, horizon)
    last = float(trajectory.step_numbers[-1])
    notes: list[str] = []
    if end_step is None:
        end_step = last + 2 * span
        if extrapolation:
            end_step = max([end_step, *(float(c["step"]) for c in extrapolation.candidates if c.get("step") is not None)])
    elif end_step <= last:
        raise UsageError(f"--to-step {end_step:g}: must be after the last checkpoint (step {trajectory.step_numbers[-1]})")
    if extrapolation:
        source_steps = extrapolation.manifest.source.get("steps")
        if source_steps and source_steps != trajectory.step_numbers:
            notes.append(
                f"the extrapolation in {extrapolation.folder} was made from steps {source_steps}, "
                f"not from this trajectory's steps {trajectory.step_numbers}"
            )
    report_inspect = inspect_trajectory(trajectory, settings)
    result, backtest_note = backtest_or_note(
        k, holdout, lambda: backtest(trajectory, list(backtest_methods or auto_candidates(k - holdout)), settings, holdout=holdout)
    )
    grid = report_grid(trajectory.step_numbers, end_step)
    selected = select_modules([m.name for m in trajectory.modules], pattern=module_pattern, limit=max_modules)
    modules, normalised, explained, names, failures = compute_curves(trajectory, settings, methods, selected, grid, horizon)
    return ReportData(
        inspect=report_inspect,
        horizon=horizon,
        horizon_steps=span,
        end_step=end_step,
        methods=list(methods),
        method_failures=failures,
        modules=modules,
        all_names=names,
        all_normalised=normalised,
        all_explained=explained,
        backtest=result,
        backtest_note=backtest_note,
        extrapolation=extrapolation,
        notes=notes,
    )
