"""The report's figures (matplotlib, Agg backend): display only, every number comes from
:class:`~nextoffline.report.data.ReportData`.

matplotlib is an optional extra (``pip install 'nextoffline[report]'``); it is imported only
when drawing, and :func:`require_matplotlib` turns its absence into a one-line error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nextoffline.errors import NextOfflineError
from nextoffline.pipeline import AUTO_MAX_ERROR, BacktestResult
from nextoffline.report.data import ReportData, short_name

__all__ = [
    "FIGURES",
    "MissingDependencyError",
    "plot_all_coefficients",
    "plot_backtest",
    "plot_candidates",
    "plot_coefficients",
    "plot_energy",
    "require_matplotlib",
]

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
    glob = [(r["step"], 100 * r["global_rank1_energy"]) for r in rows if r["global_rank1_energy"] is not None]
    if glob:
        ax1.plot(*zip(*glob), "o-", label="global  dW_t", color="#1f77b4")
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
    ax2.set_title("Size of the full-parameter update" if data.inspect.get("kind") == "full-parameter" else "Size of the LoRA update")
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
    steps = [float(c["step"]) for c in data.extrapolation.candidates if c.get("step") is not None]
    selected = data.extrapolation.selected
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
        median = data.median_normalised()
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


def plot_candidates(plt: Any, data: ReportData, path: Path) -> None:
    assert data.extrapolation is not None
    scored = sorted((c for c in data.extrapolation.candidates if c.get("score") is not None), key=lambda c: float(c["step"]))
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
    direction = "lower is better" if data.extrapolation.lower_is_better else "higher is better"
    ax.set_xlabel("target step of the candidate")
    ax.set_ylabel(f"evaluator score ({direction})")
    ax.set_title("Candidate scores from --eval-cmd")
    ax.margins(x=0.08, y=0.2)
    ax.legend(fontsize=9, loc="best")
    _style(ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
