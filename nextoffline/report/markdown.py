"""The report's Markdown (``report.md``): display only, every number comes from
:class:`~nextoffline.report.data.ReportData`."""

from __future__ import annotations

from typing import Any

from nextoffline.pipeline import AUTO_MAX_ERROR
from nextoffline.report.data import ReportData, short_name

__all__ = ["render_markdown"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _model_line(info: dict[str, Any]) -> str:
    """What was trained: the LoRA modules, or every tensor of a full-parameter run (modules = tensors)."""
    if info.get("kind") == "full-parameter":
        return (
            f"- full-parameter: {info['num_tensors']} tensors, {info['parameters']:,} parameters, dtypes {', '.join(info['dtypes'])}; "
            f"deltas against {info['reference']} (below, a module is one tensor)"
        )
    return (
        f"- LoRA: {info['num_modules']} modules in {len(info['groups'])} shape groups, r={info['rank']}, alpha={info['lora_alpha']}"
        + (" (rslora)" if info["use_rslora"] else "")
        + f", dtypes {', '.join(info['dtypes'])}"
    )


def render_markdown(data: ReportData, figures: dict[str, str]) -> str:
    info = data.inspect
    lines = [
        "# nextoffline report",
        "",
        f"- source: `{info['source']}` ({info['format']} layout)",
        f"- checkpoints: {len(info['steps'])} at steps {', '.join(map(str, info['steps']))}",
        _model_line(info),
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
    extra = ext.manifest.extrapolation
    policy = f", rank policy {extra['rank_policy']}" if extra.get("rank_policy") else ""
    lines = ["", "## Candidates", "", f"From `{ext.folder}`: predictor `{extra.get('method')}`{policy}."]
    if extra.get("note"):
        lines += ["", f"> {extra['note']}"]
    if ext.scored:
        lines += ["", f"![candidate scores]({figures['candidates']})"]
    lines += [
        "",
        "| candidate | step | coefficient | score | update / \\|dW_last\\| | energy kept at rank r | written |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in sorted(ext.candidates, key=lambda c: float(c.get("step", 0))):
        mark = "**selected**" if c.get("selected") else (f"`{c['adapter']}`" if c.get("adapter") else "no")
        lines.append(
            f"| `{c.get('label', '-')}` | {_num(c.get('step'))} | {_num(c.get('coef'))} | {_num(c.get('score'))} | "
            f"{_num(c.get('relative_update'))} | {_pct(c.get('kept_energy'))} | {mark} |"
        )
    return lines
