"""CLI glue for full-parameter trajectories (called from :mod:`nextoffline.cli.commands`).

A source is treated as full-parameter when ``--full`` is given or when probing finds
step-named folders with whole HF models and no LoRA adapter (:func:`~nextoffline.dense.layout.is_dense_source`: any
registered layout; for ``hf://`` sources the repo's file listing, :func:`nextoffline.hub.source_kind`). Hub
sources and ``--base hf://...`` are downloaded into the HF cache first (:mod:`nextoffline.hub`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from nextoffline.cli.options import ComputeArgs, FullArgs, SourceArgs
from nextoffline.errors import UsageError

__all__ = ["dense_backtest_cmd", "dense_extrapolate_cmd", "dense_inspect_cmd", "dense_push_message", "wants_dense"]

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


def _load(src: SourceArgs, full_args: FullArgs, *, progress: bool = True, trainer_state: bool = False):
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
    return load_dense_trajectory(root, base=base, source_label=src.source)


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
    src: SourceArgs, full_args: FullArgs, compute: ComputeArgs, holdout: int, methods: str | None, as_json: bool, progress: bool
) -> None:
    from nextoffline.cli.options import echo_json
    from nextoffline.cli.render import render_backtest
    from nextoffline.dense.pipeline import dense_auto_candidates, dense_backtest

    trajectory = _load(src, full_args, progress=progress)
    names = [m.strip() for m in methods.split(",")] if methods else dense_auto_candidates(len(trajectory.checkpoints) - holdout)
    result = dense_backtest(trajectory, _stats(trajectory, compute, progress), names, holdout=holdout)
    echo_json(result.to_json()) if as_json else click.echo(render_backtest(result))


def dense_extrapolate_cmd(src: SourceArgs, full_args: FullArgs, compute: ComputeArgs, *, as_json: bool, **options: Any) -> None:
    """Run the full-parameter extrapolation; under ``torchrun`` only rank 0 prints."""
    import os

    from nextoffline.cli.options import echo_json
    from nextoffline.dense.output import run_dense_extrapolate
    from nextoffline.ops.device import resolve_device

    trajectory = _load(src, full_args, progress=options.get("progress", True), trainer_state=options.get("resumable", False))
    summary = run_dense_extrapolate(trajectory, device=resolve_device(compute.device), chunk_bytes=compute.chunk_mb * 2**20, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        echo_json(summary)
        return
    extrapolation = summary["extrapolation"]
    lines = [
        f"wrote {summary['out']} (full-parameter HF model folder, {summary['processes']} process(es))",
        f"method: {extrapolation['method']}  target step: {extrapolation['target_step']:g}  coefficient: {extrapolation['coef']:g}",
    ]
    if extrapolation["note"]:
        lines.append(extrapolation["note"])
    lines += [f"warning: {w}" for w in summary["warnings"]]
    if "resumable" in summary:
        lines.append(f"resume: {summary['resumable']['command'].replace('<out>', summary['out'])}")
    click.echo("\n".join(lines))


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
