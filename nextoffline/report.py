"""Diagnostic report of a trajectory: PNG plots and a Markdown summary.

:func:`compute_report` gathers the numbers through the pipeline and the ops (inspect,
backtest, and the trajectory rank-1 coefficients ``c(t)`` of each module with every
predictor's fit and extrapolation); :func:`write_report` draws them with matplotlib's Agg
backend and writes ``report.md``, ``report.json`` and the figures atomically.

matplotlib is an optional extra (``pip install 'nextoffline[report]'``); it is imported only
when drawing, and :func:`require_matplotlib` turns its absence into a one-line error.

Coefficient curves: for module ``j`` the trajectory direction ``V`` (top right singular vector
of its stacked updates over all checkpoints) gives ``c(t) = <dW_t, V>``. A predictor's curve is
``c(t_last) + <D(t), V>`` where ``D(t)`` is the update it would add to the latest checkpoint to
reach step ``t``, so every curve passes through the last checkpoint, exactly as
``extrapolate`` applies it, and predictors whose update leaves ``V`` (NExt) are drawn on the
same axis by their component along ``V``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextoffline.errors import NextOfflineError, NotEnoughCheckpointsError, UsageError
from nextoffline.io.writer import AtomicOutputDir, check_output_location, write_json, write_text
from nextoffline.loader import iter_chunks, open_readers, plan_chunks, read_chunk
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.predictors import auto_candidates, make_predictor, parse_predictor_name
from nextoffline.ops.predictors.base import FactoredUpdate
from nextoffline.ops.predictors.trajectory import trajectory_rank1
from nextoffline.pipeline import AUTO_MAX_ERROR, BacktestResult, RunSettings, backtest, default_horizon, horizon_steps, inspect_trajectory
from nextoffline.types import Trajectory

__all__ = [
    "REPORT_METHODS",
    "MissingDependencyError",
    "ModuleCurves",
    "ReportData",
    "compute_report",
    "read_extrapolation",
    "require_matplotlib",
    "select_modules",
    "write_report",
]

LOG = logging.getLogger(__name__)

#: Predictors drawn on the coefficient plots by default.
REPORT_METHODS = ("linear", "power", "poly", "gp", "next")
GRID_POINTS = 61
FIGURES = {
    "energy": "energy.png",
    "coefficients": "coefficients.png",
    "coefficients_all": "coefficients_all.png",
    "backtest": "backtest.png",
    "candidates": "candidates.png",
}
_COLORS = {"linear": "#1f77b4", "power": "#ff7f0e", "poly": "#2ca02c", "gp": "#9467bd", "next": "#d62728"}
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


class MissingDependencyError(NextOfflineError, ImportError):
    """An optional dependency needed by the requested feature is not installed."""


def require_matplotlib() -> Any:
    """Import matplotlib with the Agg backend, or raise a one-line install hint."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "nextoffline report needs matplotlib, which is not installed: pip install 'nextoffline[report]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
    extrapolation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

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
            "extrapolation": self.extrapolation,
            "notes": self.notes,
        }


def short_name(module: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj``."""
    name = module.removeprefix("base_model.model.")
    return name.removeprefix("model.") if name.startswith("model.layers.") else name


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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


def _subchunk(chunk: FactorChunk, index: list[int]) -> FactorChunk:
    return FactorChunk([chunk.names[i] for i in index], chunk.steps, chunk.b[:, index], chunk.a[:, index], chunk.scaling[index])


def _projection(update: FactoredUpdate, chunk: FactorChunk, weights: torch.Tensor) -> torch.Tensor:
    """``<D_j, V_j>`` per module, with ``V_j = sum_i weights[j, i] s_j B_i A_i``, without dense matrices."""
    left = update.left.to(torch.float64)  # (N, m, p)
    right = update.right.to(torch.float64)  # (N, p, n)
    b = chunk.b.to(torch.float64).transpose(0, 1)  # (N, K, m, r)
    a = chunk.a.to(torch.float64).transpose(0, 1)  # (N, K, r, n)
    lb = left.mT.unsqueeze(1) @ b  # (N, K, p, r)
    ra = right.unsqueeze(1) @ a.mT  # (N, K, p, r)
    inner = (lb * ra).sum((-1, -2))  # (N, K): <D, B_i A_i>
    scale = chunk.scaling.to(torch.float64)
    return scale * (inner * weights.to(torch.float64)).sum(-1)


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
    fitted = {m: make_predictor(m, horizon=horizon, options=settings.next_options) for m in methods}
    failures: dict[str, str] = {}
    all_names: list[str] = []
    all_normalised: list[list[float]] = []
    all_explained: list[float] = []
    curves: dict[str, ModuleCurves] = {}
    plans = plan_chunks(trajectory, budget_bytes=settings.chunk_bytes)

    def observe(name: str, chunk: FactorChunk) -> None:
        if name not in fitted:
            return
        try:
            fitted[name].observe(chunk)
        except NotEnoughCheckpointsError as exc:
            failures[name] = str(exc)
            del fitted[name]

    # pass 1 (streamed, one read of every factor): coefficients of every module; observe
    for _plan, chunk in iter_chunks(trajectory, settings.device, budget_bytes=settings.chunk_bytes, reuse=True):
        rank1 = trajectory_rank1(chunk)
        coefficients = rank1.coefficients.cpu()
        for j, name in enumerate(chunk.names):
            last = float(coefficients[j, -1])
            all_names.append(name)
            all_normalised.append([float(c) / last if last else 0.0 for c in coefficients[j]])
            all_explained.append(float(rank1.explained[j]))
        index = [j for j, name in enumerate(chunk.names) if name in wanted]
        for name in group_level:
            observe(name, chunk)
        if index:
            sub = _subchunk(chunk, index)
            for name in per_module:
                observe(name, sub)
            for j in index:
                curves[chunk.names[j]] = ModuleCurves(
                    chunk.names[j], chunk.steps.tolist(), coefficients[j].tolist(), float(rank1.explained[j]), list(grid), {}
                )
    for predictor in fitted.values():
        predictor.fit()
    with open_readers(trajectory) as readers:
        for plan in plans:  # pass 2: predictions of the selected modules
            index = [j for j, name in enumerate(plan.names) if name in wanted]
            if not index:
                continue
            chunk = read_chunk(plan, trajectory, readers, settings.device)
            sub = _subchunk(chunk, index)
            weights = trajectory_rank1(sub).weights
            for name, predictor in fitted.items():
                full = name in group_level
                values = torch.full((len(index), len(grid)), float("nan"), dtype=torch.float64)
                for g, step in enumerate(grid):
                    if full and step < last_step:  # NExt only predicts forward from the latest checkpoint
                        continue
                    update = predictor.predict_update(chunk if full else sub, float(step))
                    if full:
                        update = FactoredUpdate(update.left[index], update.right[index])
                    values[:, g] = _projection(update, sub, weights).cpu()
                for row, j in enumerate(index):
                    curve = curves[chunk.names[j]]
                    base = curve.coefficients[-1]
                    curve.predictions[name] = [None if math.isnan(v) else base + v for v in values[row].tolist()]
    ordered = [curves[n] for n in selected if n in curves]
    return ordered, all_normalised, all_explained, all_names, failures


def read_extrapolation(folder: Path) -> dict[str, Any]:
    """Candidates and selection of a previous ``extrapolate`` output (eval-scored or a plain sweep)."""
    manifest_path = folder / "nextoffline.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        candidates = manifest.get("candidates") or [manifest["selected"]]
        return {
            "folder": str(folder),
            "manifest": manifest,
            "candidates": candidates,
            "selected": manifest.get("selected"),
            "scored": any("score" in c for c in candidates),
        }
    subfolders = (
        sorted((p for p in folder.iterdir() if (p / "nextoffline.json").is_file()), key=lambda p: _natural_key(p.name))
        if folder.is_dir()
        else []
    )
    if not subfolders:
        raise UsageError(
            f"--extrapolation {folder}: no nextoffline.json here or in its subfolders; pass the --out folder of `nextoffline extrapolate`"
        )
    manifests = [json.loads((p / "nextoffline.json").read_text(encoding="utf-8")) for p in subfolders]
    candidates = [dict(m["selected"], label=m["selected"].get("label", p.name), adapter=p.name) for p, m in zip(subfolders, manifests)]
    return {"folder": str(folder), "manifest": manifests[0], "candidates": candidates, "selected": None, "scored": False}


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
    horizon = settings.horizon or default_horizon(k)
    span = horizon_steps(trajectory, horizon)
    last = float(trajectory.step_numbers[-1])
    notes: list[str] = []
    if end_step is None:
        end_step = last + 2 * span
        if extrapolation:
            end_step = max([end_step, *(float(c["step"]) for c in extrapolation["candidates"] if c.get("step") is not None)])
    elif end_step <= last:
        raise UsageError(f"--to-step {end_step:g}: must be after the last checkpoint (step {trajectory.step_numbers[-1]})")
    if extrapolation:
        source_steps = extrapolation["manifest"].get("source", {}).get("steps")
        if source_steps and source_steps != trajectory.step_numbers:
            notes.append(
                f"the extrapolation in {extrapolation['folder']} was made from steps {source_steps}, "
                f"not from this trajectory's steps {trajectory.step_numbers}"
            )
    report_inspect = inspect_trajectory(trajectory, settings)
    result, backtest_note = None, ""
    if k - holdout >= 3:
        result = backtest(trajectory, list(backtest_methods or auto_candidates(k - holdout)), settings, holdout=holdout)
    else:
        backtest_note = f"no backtest: {k} checkpoints leave {k - holdout} to fit on with holdout {holdout}; at least 3 are needed"
    first = float(trajectory.step_numbers[0])
    grid = sorted({*(first + (end_step - first) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)), *map(float, trajectory.step_numbers)})
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


# ------------------------------------------------------------------------------------------ plots


def _color(method: str, index: int) -> str:
    base = method.partition("@")[0]
    return _COLORS.get(method) or (_EXTRA_COLORS[index % len(_EXTRA_COLORS)] if "@" in method else _COLORS.get(base, "#7f7f7f"))


def _style(ax: Any) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)


def plot_energy(plt: Any, data: ReportData, path: Path) -> None:
    rows = data.inspect["per_step"]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax1.plot(steps, [100 * r["global_rank1_energy"] for r in rows], "o-", label="global  dW_t", color="#1f77b4")
    local = [(r["step"], 100 * r["local_rank1_energy"]) for r in rows if r["local_rank1_energy"] is not None]
    if local:
        ax1.plot(*zip(*local), "s--", label="local  dW_t - dW_prev", color="#ff7f0e")
    ax1.set_ylim(0, 105)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("energy in the top singular direction (%)")
    ax1.set_title("Rank-1 energy per checkpoint (all modules)")
    ax1.legend(loc="lower right", fontsize=9)
    _style(ax1)
    ax2.plot(steps, [r["global_norm"] for r in rows], "o-", color="#2ca02c")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("|dW_t|  (Frobenius, all modules)")
    ax2.set_title("Size of the LoRA update")
    ax2.set_ylim(bottom=0)
    _style(ax2)
    fig.suptitle(
        f"{100 * data.inspect['trajectory_explained_variance']:.1f}% of the update energy lies on one trajectory direction per module",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _candidate_marks(data: ReportData) -> tuple[list[float], float | None]:
    if not data.extrapolation:
        return [], None
    steps = [float(c["step"]) for c in data.extrapolation["candidates"] if c.get("step") is not None]
    selected = data.extrapolation.get("selected")
    return steps, (float(selected["step"]) if selected else None)


def plot_coefficients(plt: Any, data: ReportData, path: Path) -> None:
    count = len(data.modules)
    cols = min(3, max(count, 1))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.9), squeeze=False, constrained_layout=True)
    last = data.inspect["steps"][-1]
    candidate_steps, selected_step = _candidate_marks(data)
    handles: dict[str, Any] = {}
    for ax, curve in zip(axes.flat, data.modules):
        ax.axvspan(last, data.end_step, color="#f2f2f2", zorder=0)
        for i, method in enumerate(data.methods):
            values = curve.predictions.get(method)
            if not values:
                continue
            pts = [(x, y) for x, y in zip(curve.grid, values) if y is not None]
            if pts:
                (line,) = ax.plot(*zip(*pts), "-", color=_color(method, i), linewidth=1.6, alpha=0.9, label=method)
                handles.setdefault(method, line)
        observed = ax.plot(curve.steps, curve.coefficients, "o", color="black", markersize=4.5, zorder=5, label="checkpoints")[0]
        handles.setdefault("checkpoints c(t)", observed)
        for step in candidate_steps:
            is_selected = selected_step is not None and math.isclose(step, selected_step)
            line = ax.axvline(
                step,
                color="#e6a100" if is_selected else "#999999",
                linestyle="-" if is_selected else ":",
                linewidth=2.2 if is_selected else 1.1,
                alpha=0.9,
                zorder=1,
            )
            handles.setdefault("selected candidate" if is_selected else "candidate steps", line)
        pad = 0.03 * (data.end_step - curve.steps[0])
        ax.set_xlim(curve.steps[0] - pad, data.end_step + pad)
        ax.set_title(f"{short_name(curve.name)}\nrank-1 explains {100 * curve.explained:.1f}%", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("c(t)", fontsize=8)
        ax.tick_params(labelsize=8)
        _style(ax)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.suptitle(
        "Trajectory rank-1 coefficient c(t) per module, with each predictor's fit and extrapolation\n"
        "(curves pass through the last checkpoint, as extrapolate applies them; grey = beyond the last checkpoint)",
        fontsize=10,
    )
    fig.legend(
        list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=min(len(handles), 8), fontsize=9, frameon=False
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all_coefficients(plt: Any, data: ReportData, path: Path) -> None:
    steps = data.inspect["steps"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    alpha = max(0.08, min(0.6, 8 / max(len(data.all_normalised), 1)))
    for series in data.all_normalised:
        ax1.plot(steps, series, "-", color="#1f77b4", alpha=alpha, linewidth=0.8)
    if data.all_normalised:
        median = torch.tensor(data.all_normalised, dtype=torch.float64).median(dim=0).values.tolist()
        ax1.plot(steps, median, "o-", color="black", linewidth=2, markersize=4, label="median over modules")
        ax1.plot([steps[0], steps[-1]], [steps[0] / steps[-1], 1.0], "--", color="#d62728", linewidth=1, label="proportional to step")
        ax1.legend(loc="upper left", fontsize=9)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("c(t) / c(last)")
    ax1.set_title(f"Coefficient trajectories of all {len(data.all_normalised)} modules (normalised)")
    _style(ax1)
    ax2.hist([100 * e for e in data.all_explained], bins=20, range=(0, 100), color="#2ca02c", edgecolor="white")
    ax2.set_xlabel("energy of the module's trajectory on one direction (%)")
    ax2.set_ylabel("modules")
    ax2.set_title("How rank-1 each module's trajectory is")
    _style(ax2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_backtest(plt: Any, result: BacktestResult, path: Path) -> None:
    names = sorted(result.errors, key=result.errors.__getitem__)
    errors = [result.errors[n] for n in names]
    finite = [e for e in errors if math.isfinite(e)]
    cap = max(1.6, min(max(finite, default=1.0) * 1.08, 5.0))
    best, _ = result.best()
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(names) + 1.9), constrained_layout=True)
    positions = list(range(len(names)))[::-1]
    colors = ["#2ca02c" if n == best else ("#1f77b4" if e < 1 else "#b0b0b0") for n, e in zip(names, errors)]
    ax.barh(positions, [min(e, cap) if math.isfinite(e) else cap for e in errors], color=colors, height=0.65)
    for pos, name, error in zip(positions, names, errors):
        per_step = [min(e, cap) for e in result.per_step[name] if math.isfinite(e)]
        ax.plot(
            per_step,
            [pos] * len(per_step),
            "D",
            color="black",
            markersize=3.5,
            alpha=0.8,
            linestyle="none",
            label="per held-out step" if pos == positions[0] else None,
        )
        text = (
            (f"{error:.3f}" if math.isfinite(error) else "inf") + (" (clipped)" if error > cap else "") + ("  best" if name == best else "")
        )
        right = max([min(error, cap) if math.isfinite(error) else cap, *per_step])
        ax.text(right + 0.02 * cap, pos, text, va="center", fontsize=8.5, fontweight="bold" if name == best else "normal")
    ax.axvline(1.0, color="#d62728", linestyle="--", linewidth=1.2, label="1.0 = stopping at the last checkpoint")
    ax.axvline(AUTO_MAX_ERROR, color="#d62728", linestyle=":", linewidth=1, label=f"{AUTO_MAX_ERROR} = auto's threshold")
    ax.set_yticks(positions, names)
    for label in ax.get_yticklabels():
        if label.get_text() == best:
            label.set_color("#2ca02c")
            label.set_fontweight("bold")
    ax.set_xlim(0, cap * 1.18)
    ax.set_xlabel("relative error of the predicted held-out update (lower is better)")
    ax.set_title(
        f"Backtest: fit on steps {result.observed_steps[0]}..{result.observed_steps[-1]}, predict {', '.join(map(str, result.heldout_steps))}"
        + (f"; best: {best}" if best else "; nothing beats stopping"),
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    _style(ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lower_is_better(extrapolation: dict[str, Any]) -> bool:
    return "lower is better" in str(extrapolation["manifest"].get("extrapolation", {}).get("note", "")) or "--eval-lower-is-better" in str(
        extrapolation["manifest"].get("command", "")
    )


def plot_candidates(plt: Any, data: ReportData, path: Path) -> None:
    assert data.extrapolation is not None
    scored = sorted((c for c in data.extrapolation["candidates"] if c.get("score") is not None), key=lambda c: float(c["step"]))
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    steps = [float(c["step"]) for c in scored]
    scores = [float(c["score"]) for c in scored]
    ax.plot(steps, scores, "o-", color="#1f77b4", zorder=3, label="candidates")
    reference = next((c for c in scored if float(c["coef"]) == 0), None)
    if reference is not None:
        ax.axhline(float(reference["score"]), color="#7f7f7f", linestyle="--", linewidth=1.2, label="coefficient 0 (no extrapolation)")
    chosen = next((c for c in scored if c.get("selected")), None)
    if chosen is not None:
        ax.plot(
            float(chosen["step"]),
            float(chosen["score"]),
            "*",
            color="#d62728",
            markersize=17,
            zorder=4,
            label=f"selected: {chosen.get('label', '')}",
        )
    for c in scored:
        ax.annotate(
            f"c={float(c['coef']):.3g}",
            (float(c["step"]), float(c["score"])),
            textcoords="offset points",
            xytext=(0, 11),
            ha="center",
            fontsize=8,
        )
    direction = "lower is better" if _lower_is_better(data.extrapolation) else "higher is better"
    ax.set_xlabel("target step of the candidate")
    ax.set_ylabel(f"evaluator score ({direction})")
    ax.set_title("Candidate scores from --eval-cmd")
    ax.margins(x=0.08, y=0.2)
    ax.legend(fontsize=9, loc="best")
    _style(ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(data: ReportData, figures: dict[str, str]) -> str:
    info = data.inspect
    lines = [
        "# nextoffline report",
        "",
        f"- source: `{info['source']}` ({info['format']} layout)",
        f"- checkpoints: {len(info['steps'])} at steps {', '.join(map(str, info['steps']))}",
        f"- LoRA: {info['num_modules']} modules in {len(info['groups'])} shape groups, r={info['rank']}, alpha={info['lora_alpha']}"
        + (" (rslora)" if info["use_rslora"] else "")
        + f", dtypes {', '.join(info['dtypes'])}",
        f"- trajectory rank-1: {_pct(info['trajectory_explained_variance'])} of the update energy lies on one direction per module",
        f"- horizon: {data.horizon} checkpoints = {data.horizon_steps:g} steps (coefficient 1)",
        "",
    ]
    lines += [f"> note: {n}" for n in data.notes]
    lines += [
        "## Rank-1 energy per checkpoint",
        "",
        f"![rank-1 energy]({figures['energy']})",
        "",
        "| step | rank-1 energy (global) | rank-1 energy (local) | \\|dW\\| |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['step']} | {_pct(r['global_rank1_energy'])} | {_pct(r['local_rank1_energy'])} | {r['global_norm']:.4g} |"
        for r in info["per_step"]
    ]
    lines += [
        "",
        "## Trajectory coefficients",
        "",
        "Per module, `c(t)` is the component of the update `dW_t` along the module's top trajectory direction. Each predictor's curve is "
        "`c(last) + <D(t), V>`: what `extrapolate` would add to the latest checkpoint to reach step `t`.",
        "",
        f"![coefficient trajectories]({figures['coefficients']})",
        "",
        f"![all modules]({figures['coefficients_all']})",
        "",
        "| module | rank-1 explains | " + " | ".join(f"{m} at step {data.end_step:g}" for m in data.methods) + " |",
        "|---|---:|" + "---:|" * len(data.methods),
    ]
    for curve in data.modules:
        ends = []
        for m in data.methods:
            values = curve.predictions.get(m) or []
            ends.append(
                _num(values[-1] / curve.coefficients[-1]) + "x" if values and values[-1] is not None and curve.coefficients[-1] else "-"
            )
        lines.append(f"| `{short_name(curve.name)}` | {_pct(curve.explained)} | " + " | ".join(ends) + " |")
    lines.append("")
    lines.append("(values are `c(end) / c(last)`: 1.0x = no change from the latest checkpoint)")
    for name, why in data.method_failures.items():
        lines.append(f"\n> `{name}` could not be fitted: {why}")
    lines += ["", "## Backtest", ""]
    if data.backtest is None:
        lines.append(data.backtest_note)
    else:
        bt = data.backtest
        best, error = bt.best()
        lines += [
            f"Fit on steps {bt.observed_steps[0]}..{bt.observed_steps[-1]}, predict the held-out steps {', '.join(map(str, bt.heldout_steps))}. "
            "Error = |predicted - true| / |true - last observed|: 1.0 is no better than stopping at the last checkpoint.",
            "",
            f"![backtest errors]({figures['backtest']})",
            "",
            "| method | error | per held-out step |",
            "|---|---:|---|",
        ]
        for name in sorted(bt.errors, key=bt.errors.__getitem__):
            lines.append(f"| `{name}` | {bt.errors[name]:.3f} | {', '.join(f'{e:.3f}' for e in bt.per_step[name])} |")
        for name, why in bt.failures.items():
            lines.append(f"| `{name}` | n/a | {why} |")
        lines += [
            "",
            f"**auto would choose: `{best}`** (error {error:.3f})"
            if best
            else f"**auto would keep the latest weights**: no predictor's error is below {AUTO_MAX_ERROR}.",
        ]
    if data.extrapolation is not None:
        lines += _candidates_markdown(data, figures)
    lines += [
        "",
        "---",
        "Nothing guarantees that extrapolation helps: a low backtest error is evidence, an evaluator score on the candidates is a test.",
        "",
    ]
    return "\n".join(lines)


def _candidates_markdown(data: ReportData, figures: dict[str, str]) -> list[str]:
    ext = data.extrapolation
    assert ext is not None
    manifest = ext["manifest"]
    extra = manifest.get("extrapolation", {})
    lines = ["", "## Candidates", "", f"From `{ext['folder']}`: predictor `{extra.get('method')}`, rank policy {extra.get('rank_policy')}."]
    if extra.get("note"):
        lines += ["", f"> {extra['note']}"]
    if ext["scored"]:
        lines += ["", f"![candidate scores]({figures['candidates']})"]
    lines += [
        "",
        "| candidate | step | coefficient | score | update / \\|dW_last\\| | energy kept at rank r | written |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in sorted(ext["candidates"], key=lambda c: float(c.get("step", 0))):
        mark = "**selected**" if c.get("selected") else (f"`{c['adapter']}`" if c.get("adapter") else "no")
        lines.append(
            f"| `{c.get('label', '-')}` | {_num(c.get('step'))} | {_num(c.get('coef'))} | {_num(c.get('score'))} | "
            f"{_num(c.get('relative_update'))} | {_pct(c.get('kept_energy'))} | {mark} |"
        )
    return lines


def write_report(out_dir: Path, data: ReportData, *, overwrite: bool = False, sources: Sequence[Path] = ()) -> dict[str, Path]:
    """Draw the figures and write ``report.md`` and ``report.json`` atomically; returns the written files."""
    plt = require_matplotlib()
    check_output_location(out_dir, sources=tuple(sources), overwrite=overwrite)
    names = dict(FIGURES)
    if data.backtest is None:
        names.pop("backtest")
    if not (data.extrapolation and data.extrapolation["scored"]):
        names.pop("candidates")
    with AtomicOutputDir(out_dir, overwrite=overwrite) as tmp:
        plot_energy(plt, data, tmp / names["energy"])
        plot_coefficients(plt, data, tmp / names["coefficients"])
        plot_all_coefficients(plt, data, tmp / names["coefficients_all"])
        if "backtest" in names:
            assert data.backtest is not None
            plot_backtest(plt, data.backtest, tmp / names["backtest"])
        if "candidates" in names:
            plot_candidates(plt, data, tmp / names["candidates"])
        write_text(tmp / "report.md", render_markdown(data, names))
        write_json(tmp / "report.json", data.to_json())
    files = {key: out_dir / name for key, name in names.items()}
    files.update(markdown=out_dir / "report.md", json=out_dir / "report.json")
    return files
