"""Human-readable rendering of command results (pure string functions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nextoffline.artifacts import EVAL_LOG_DIR
from nextoffline.pipeline import BacktestResult

if TYPE_CHECKING:
    from nextoffline.extrapolate_job import ExtrapolateOutcome

__all__ = ["extrapolation_summary", "render_backtest", "render_extrapolation", "render_inspect"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def render_inspect(report: dict[str, Any]) -> str:
    lines = [
        f"source      {report['source']}",
        f"format      {report['format']}",
        f"steps       {', '.join(map(str, report['steps']))} ({len(report['steps'])} checkpoints)",
        f"modules     {report['num_modules']} LoRA modules in {len(report['groups'])} shape groups; r={report['rank']} alpha={report['lora_alpha']}"
        + (" rslora" if report["use_rslora"] else ""),
        f"dtypes      {', '.join(report['dtypes'])}",
        f"trajectory  {_pct(report['trajectory_explained_variance'])} of the update energy lies on one direction per module",
        "",
        "  step   rank-1 energy (global)   rank-1 energy (local)   |dW|",
    ]
    for row in report["per_step"]:
        lines.append(
            f"{row['step']:>6}   {_pct(row['global_rank1_energy']):>22}   {_pct(row['local_rank1_energy']):>21}   {row['global_norm']:.4g}"
        )
    return "\n".join(lines)


def render_backtest(result: BacktestResult) -> str:
    lines = [
        f"fit on steps {result.observed_steps[0]}..{result.observed_steps[-1]}, predicting held-out steps {', '.join(map(str, result.heldout_steps))}",
        "error = |predicted - true| / |true - last observed|   (1.0 = no better than stopping; lower is better)",
        f"time axes: {', '.join(f'{k} = {v}' for k, v in result.time_axes.items())}; NAME:AXIS fits the trend on that axis",
        "",
        f"  {'method':<12} {'error':>8}   per held-out step",
    ]
    for name, error in sorted(result.errors.items(), key=lambda kv: kv[1]):
        per = "  ".join(f"{e:.3f}" for e in result.per_step[name])
        lines.append(f"  {name:<12} {error:>8.3f}   {per}")
    for name, why in result.failures.items():
        lines.append(f"  {name:<12} {'n/a':>8}   {why}")
    for target in result.targets:
        lines += _render_target(target)
    lines += [f"note: {n}" for n in result.notes]
    best, error = result.best()
    lines.append("")
    what = "mean damped error over the targets" if result.target_means() else "error"
    lines.append(f"best: {best} ({what} {error:.3f})" if best else "best: none beats stopping at the last checkpoint")
    return "\n".join(lines)


#: Rows of the per-target table (the best ones; --json has every candidate).
_TARGET_ROWS = 8


def _render_target(target) -> list[str]:
    """Rolling-origin scores at one target's lead: the lines that explain horizon, damping, band."""
    lead = f"{target.lead} checkpoints ahead" + (f", scored at {target.scored_lead}" if target.scored_lead != target.lead else "")
    lines = [
        "",
        f"target step {target.target_step:g} ({lead}; fits ending at steps {', '.join(map(str, target.origin_steps))})",
        "  damped = last + a * (forecast - last), a in [0, 1] chosen on the other origins (0 = stop); band = per-origin range",
        f"  {'method':<18} {'error':>7} {'damped':>7} {'a':>5}   band",
    ]
    ranked = sorted(target.scores.items(), key=lambda kv: kv[1].damped_error)
    for name, score in ranked[:_TARGET_ROWS]:
        band = f"{score.band[0]:.3f}..{score.band[1]:.3f}"
        lines.append(f"  {name:<18} {score.error:>7.3f} {score.damped_error:>7.3f} {score.damping:>5.2f}   {band}")
    if len(ranked) > _TARGET_ROWS:
        lines.append(f"  ... {len(ranked) - _TARGET_ROWS} more (--json lists all)")
    return lines


def render_extrapolation(summary: dict[str, Any]) -> str:
    lines = [f"method: {summary['method']}" + (f"  ({summary['note']})" if summary["note"] else "")]
    for f in summary.get("forecast") or []:
        lines.append(
            f"  step {f['step']:g}: {f['lead_checkpoints']} checkpoints ahead, damping a = {f['damping']:.2f}, "
            f"backtest error {f['damped_error']:.3f} (band {f['band'][0]:.3f}..{f['band'][1]:.3f} over origins at steps "
            f"{', '.join(map(str, f['origin_steps']))})"
        )
    for c in summary["candidates"]:
        score = f"  score {c['score']:g}" if "score" in c else ""
        mark = "selected" if c.get("selected") else ("written" if c["written"] else "not kept")
        lines.append(
            f"  step {c['step']:g} (coef {c['coef']:g}): update {c['relative_update']:.3g} of |dW_last|, "
            f"{_pct(c['kept_energy']).strip()} of it kept at rank r{score}  [{mark}]"
        )
    lines.append(f"wrote {summary['out']}")
    resume = summary.get("resume")
    if resume:
        lines.append(f"resumable checkpoint: {resume['checkpoint_dir']}")
        lines.append(f"resume with: {resume['command']}")
        lines += [f"note: {n}" for n in resume["notes"]]
    return "\n".join(lines)


def extrapolation_summary(outcome: ExtrapolateOutcome) -> dict[str, Any]:
    """The JSON-able summary of an ``extrapolate`` job (``--json``, and :func:`render_extrapolation`)."""
    result = outcome.extrapolation
    candidates = []
    for i, c in enumerate(result.candidates):
        entry: dict[str, Any] = {
            "label": outcome.labels[i],
            "step": c.target_step,
            "coef": c.coef,
            "kept_energy": c.kept_energy_mean,
            "relative_update": c.relative_update,
        }
        if outcome.selected is not None:
            entry.update(outcome.scores[i])
            entry["written"] = i == outcome.selected or outcome.keep_all
        else:
            entry["written"] = True
            entry["adapter"] = "." if len(result.candidates) == 1 else entry["label"]
        candidates.append(entry)
    summary: dict[str, Any] = {
        "out": str(outcome.out_dir),
        "method": result.method,
        "note": result.note,
        "horizon_steps": result.horizon_steps,
        "candidates": candidates,
        "backtest": result.backtest.to_json() if result.backtest else None,
        "forecast": result.forecast,
    }
    if outcome.selected is not None:
        summary["selected"] = candidates[outcome.selected]
        summary["eval_logs"] = str(outcome.out_dir / EVAL_LOG_DIR)
    if outcome.resume is not None:
        resume = outcome.resume
        summary["resume"] = {"checkpoint_dir": str(resume.checkpoint_dir), "command": resume.command, "notes": list(resume.notes)}
    return summary
