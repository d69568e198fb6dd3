"""CLI glue for full-parameter trajectories (called from :mod:`nextoffline.cli.commands`).

A source is treated as full-parameter when ``--full`` is given or when probing finds
step-named folders with whole HF models and no LoRA adapter (:func:`~nextoffline.dense.layout.is_dense_source`: any
registered layout; for ``hf://`` sources the repo's file listing, :func:`nextoffline.hub.source_kind`). Hub
sources and ``--base hf://...`` are downloaded into the HF cache first (:mod:`nextoffline.hub`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import click

from nextoffline.cli.options import ComputeArgs, FullArgs, SourceArgs
from nextoffline.errors import UsageError

__all__ = [
    "dense_backtest_cmd",
    "dense_extrapolate_cmd",
    "dense_inspect_cmd",
    "dense_push_message",
    "dense_report_data",
    "wants_dense",
]

LOG = logging.getLogger(__name__)


def wants_dense(src: SourceArgs, full_args: FullArgs) -> bool:
    """True when the command should take the full-parameter path."""
    from nextoffline import hub
    from nextoffline.dense.layout import is_dense_source

    source = src.source
    if full_args.full:
        if not source or src.adapters:
            raise UsageError("--full needs a run folder or hf://owner/repo[@revision][/subfolder] as SOURCE (--adapter is LoRA-only)")
        return True
    detected = False
    if source and not src.adapters:
        detected = hub.source_kind(source, token=src.token) == hub.KIND_FULL if hub.is_hub_source(source) else is_dense_source(Path(source))
    if full_args.base is not None and not detected:
        raise UsageError("--base applies to full-parameter trajectories only; add --full (or point at a full-parameter run)")
    return detected


def _load(src: SourceArgs, full_args: FullArgs, *, progress: bool = True, trainer_state: bool = False, max_step: int | None = None):
    """The trajectory (Hub sources and a Hub ``--base`` downloaded first); ``source_label`` is SOURCE as given."""
    from nextoffline import hub
    from nextoffline.dense.layout import load_dense_trajectory

    assert src.source is not None
    root = Path(src.source)
    if hub.is_hub_source(src.source):
        root = hub.materialize_source(
            src.source, token=src.token, include_trainer_state=trainer_state, progress=progress, kind=hub.KIND_FULL
        )
    base = None if full_args.base is None else Path(full_args.base)
    if full_args.base is not None and hub.is_hub_source(full_args.base):
        base = hub.materialize_model(full_args.base, token=src.token, progress=progress)
    trajectory = load_dense_trajectory(root, base=base, source_label=src.source, max_step=max_step)
    return dataclasses.replace(trajectory, base_label=full_args.base) if full_args.base is not None else trajectory


def _stats(trajectory, compute: ComputeArgs, progress: bool):
    from nextoffline.dense.dist import Group
    from nextoffline.dense.pipeline import collect_stats
    from nextoffline.ops.device import resolve_device

    return collect_stats(trajectory, resolve_device(compute.device), compute.chunk_mb * 2**20, Group(), progress=progress)


def _render_inspect(report: dict[str, Any]) -> str:
    lines = [
        f"source: {report['source']}",
        f"format: {report['format']} (full-parameter), reference: {report['reference']}",
        f"steps: {', '.join(str(s) for s in report['steps'])}",
        f"tensors: {report['num_tensors']}, parameters: {report['parameters']:,}, dtypes: {', '.join(report['dtypes'])}",
        f"trajectory explained variance (top temporal direction): {report['trajectory_explained_variance']:.3f}",
        f"rank-1 energy of the 2-D global deltas: {report['rank1_tensors']} tensors "
        f"({report['rank1_skipped_over_budget']} over the --chunk-mb budget skipped)",
        "step  |global delta|  |local delta|  rank-1 energy  unchanged 16-bit",
    ]
    for row in report["per_step"]:
        local = f"{row['local_norm']:.4g}" if row["local_norm"] is not None else "-"
        frac = f"{row['unchanged_16bit_fraction']:.1%}" if row["unchanged_16bit_fraction"] is not None else "-"
        energy = f"{row['global_rank1_energy']:.3f}" if row["global_rank1_energy"] is not None else "-"
        lines.append(f"{row['step']:>5} {row['global_norm']:>14.4g} {local:>14} {energy:>14} {frac:>17}")
    if report["warning"]:
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)


def dense_inspect_cmd(src: SourceArgs, full_args: FullArgs, compute: ComputeArgs, as_json: bool, progress: bool) -> None:
    from nextoffline.cli.options import echo_json
    from nextoffline.dense.pipeline import dense_inspect, rank1_energy
    from nextoffline.ops.device import resolve_device

    trajectory = _load(src, full_args, progress=progress)
    rank1 = rank1_energy(trajectory, resolve_device(compute.device), compute.chunk_mb * 2**20)
    report = dense_inspect(trajectory, _stats(trajectory, compute, progress), rank1)
    echo_json(report) if as_json else click.echo(_render_inspect(report))


def dense_backtest_cmd(
    src: SourceArgs,
    full_args: FullArgs,
    compute: ComputeArgs,
    holdout: int,
    methods: str | None,
    as_json: bool,
    progress: bool,
    *,
    predictor_args: Any = None,
    forecast: Any = None,
) -> None:
    from nextoffline.cli.options import echo_json
    from nextoffline.cli.render import render_backtest
    from nextoffline.dense.dist import Group
    from nextoffline.dense.next import DenseNext
    from nextoffline.dense.pipeline import collect_stats
    from nextoffline.dense.select import dense_auto_candidates, dense_backtest, next_in_auto
    from nextoffline.ops.device import resolve_device
    from nextoffline.ops.predictors import NextOptions
    from nextoffline.pipeline import default_horizon

    trajectory = _load(src, full_args, progress=progress)
    k = len(trajectory.checkpoints)
    horizon = (predictor_args.horizon if predictor_args else None) or default_horizon(k)
    device = resolve_device(compute.device)
    epochs = predictor_args.next_epochs if predictor_args else NextOptions.epochs
    ctx = DenseNext(Group(device=device), device, compute.chunk_mb * 2**20, NextOptions(epochs=epochs))
    if forecast is not None:
        ctx = DenseNext(ctx.group, device, ctx.budget, ctx.options, forecast.next_budget_s)
    if methods:
        names = [m.strip() for m in methods.split(",")]
        wants_next = any(n.partition("@")[0] == "next" for n in names)
    else:
        wants_next, why = next_in_auto(trajectory, ctx, holdout=holdout, horizon=horizon)
        if why:
            LOG.warning(why)
        names = dense_auto_candidates(k - holdout, with_next=wants_next)
    stats = collect_stats(trajectory, device, ctx.budget, ctx.group, progress=progress, next_horizon=horizon if wants_next else None)
    result = dense_backtest(trajectory, stats, names, holdout=holdout, next_ctx=ctx if wants_next else None, horizon=horizon)
    echo_json(result.to_json()) if as_json else click.echo(render_backtest(result))


def dense_report_data(
    src: SourceArgs, full_args: FullArgs, compute: ComputeArgs, *, out_dir: Path, overwrite: bool, progress: bool, **options: Any
):
    """The report's numbers for a full-parameter run (rendered by :func:`nextoffline.report.write_report`)."""
    from nextoffline.dense.pipeline import rank1_energy
    from nextoffline.dense.report import compute_dense_report
    from nextoffline.io.writer import check_output_location
    from nextoffline.ops.device import resolve_device

    trajectory = _load(src, full_args, progress=progress)
    check_output_location(out_dir, sources=(trajectory.source, *(c.folder for c in trajectory.checkpoints)), overwrite=overwrite)
    rank1 = rank1_energy(trajectory, resolve_device(compute.device), compute.chunk_mb * 2**20)
    return compute_dense_report(trajectory, _stats(trajectory, compute, progress), rank1, **options)


def dense_extrapolate_cmd(
    src: SourceArgs, full_args: FullArgs, compute: ComputeArgs, *, as_json: bool, max_step: int | None = None, **options: Any
) -> None:
    """Run the full-parameter extrapolation; under ``torchrun`` only rank 0 prints."""
    import os

    from nextoffline.cli.options import echo_json
    from nextoffline.dense.output import run_dense_extrapolate
    from nextoffline.ops.device import resolve_device
    from nextoffline.ops.predictors import NextOptions

    trajectory = _load(
        src, full_args, progress=options.get("progress", True), trainer_state=options.get("resumable", False), max_step=max_step
    )
    next_options = NextOptions(epochs=options.pop("next_epochs", NextOptions.epochs))
    summary = run_dense_extrapolate(
        trajectory, device=resolve_device(compute.device), chunk_bytes=compute.chunk_mb * 2**20, next_options=next_options, **options
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    echo_json(summary) if as_json else click.echo(_render_extrapolation(summary))


def _render_extrapolation(summary: dict[str, Any]) -> str:
    extrapolation, selected = summary["extrapolation"], summary["selected"]
    lines = [f"wrote {summary['out']} (full-parameter HF model folder{'s' if not selected else ''}, {summary['processes']} process(es))"]
    lines.append(f"method: {extrapolation['method']}")
    if selected:
        lines[-1] += f"  target step: {selected['step']:g}  coefficient: {selected['coef']:g}"
    for c in summary.get("candidates") or []:
        score = f"  score {c['score']:g}" if "score" in c else ""
        where = c.get("adapter")
        shown = "selected: OUT" if where == "." else (f"OUT/{where}" if where else "not kept")
        lines.append(f"  {c['label']:>12}  step {c['step']:g}  coefficient {c['coef']:g}{score}  ({shown})")
    if extrapolation["note"]:
        lines.append(extrapolation["note"])
    lines += [f"warning: {w}" for w in summary["warnings"]]
    if "resumable" in summary:
        lines.append(f"resume: {summary['resumable']['command'].replace('<out>', summary['out'])}")
    return "\n".join(lines)


def dense_push_message(folder: Path) -> str | None:
    """The commit message for pushing a full-parameter ``extrapolate`` output, ``None`` for any other folder.

    A full-parameter output is an HF model folder (``model.safetensors`` or an index) with a
    ``nextoffline.json`` of kind ``full-parameter``.
    """
    import json

    from nextoffline.artifacts import MANIFEST_NAME
    from nextoffline.dense.layout import INDEX_NAME, SINGLE_NAME
    from nextoffline.errors import OutputError

    path = folder / MANIFEST_NAME
    if not path.is_file() or not ((folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file()):
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: not a nextoffline manifest ({type(exc).__name__}); re-run `nextoffline extrapolate`") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "full-parameter":
        return None
    label = (manifest.get("source") or {}).get("label", folder.name)
    extrapolation = manifest.get("extrapolation") or {}
    method, target = extrapolation.get("method", "none"), extrapolation.get("target_step")
    if method == "none":
        return f"nextoffline: latest weights of {label} (full-parameter; no predictor beat stopping)"
    at = f" to step {target:g}" if isinstance(target, (int, float)) else ""
    return f"nextoffline: {method} extrapolation of {label}{at} (full-parameter)"
