"""Write an extrapolated full-parameter model: an HF model folder, manifest, optional resumable checkpoint.

The output folder mirrors the latest checkpoint: the same weight files (same names, headers,
key order, dtypes and therefore sharding and ``model.safetensors.index.json``), plus its
``config.json``, generation config and tokenizer files; trainer state stays out (it goes to
``resume/`` with ``--resumable``). Rank 0 creates every weight file with the latest
checkpoint's header at its full size; each rank then writes its tensors' bytes in place. The
whole folder appears atomically (:class:`~nextoffline.io.writer.AtomicOutputDir`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextoffline import __version__
from nextoffline.artifacts import MANIFEST_NAME, RESUME_DIR
from nextoffline.dense.dist import Group, init_from_env
from nextoffline.dense.layout import DenseCheckpoint, DenseTrajectory
from nextoffline.dense.pipeline import (
    DenseChoice,
    collect_stats,
    resolution_warning,
    select_predictor,
    write_extrapolated_model,
)
from nextoffline.errors import OutputError
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files
from nextoffline.formats.trl import TRAINER_WEIGHTLESS
from nextoffline.io.writer import AtomicOutputDir, check_output_location, copy_file, write_json

__all__ = ["TRAINER_STATE_FILES", "DenseRequest", "run_dense_extrapolate"]

LOG = logging.getLogger(__name__)

#: Files of an HF Trainer checkpoint that are training state, not part of the model folder.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


def _is_trainer_state(name: str) -> bool:
    return name in TRAINER_STATE_FILES or (name.startswith("rng_state") and name.endswith(".pth"))


def _create_weight_files(latest: DenseCheckpoint, tmp: Path) -> None:
    """Each weight file with the latest's header bytes, extended to its full size (data filled by the ranks)."""
    for name in latest.files:
        source = latest.folder / name
        with source.open("rb") as handle:
            header = handle.read(latest.header_bytes[name])
        target = tmp / name
        with target.open("wb") as handle:
            handle.write(header)
            handle.truncate(source.stat().st_size)


def _copy_model_files(latest: DenseCheckpoint, tmp: Path) -> list[str]:
    """Config, tokenizer, generation config and the index: every top-level non-weight, non-trainer file."""
    copied = []
    for child in sorted(latest.folder.iterdir()):
        if child.is_file() and child.name not in latest.files and not _is_trainer_state(child.name):
            copy_file(child, tmp / child.name)
            copied.append(child.name)
    return copied


def _resumable_refusal(trajectory: DenseTrajectory) -> str | None:
    latest = trajectory.latest.folder
    if trajectory.layout != "hf-trainer":
        return f"{trajectory.source}: --resumable needs HF Trainer checkpoint-N/ folders; this run has plain step folders"
    check_resume_files(  # the no-silent-loss rule of every --resumable writer: refuses naming the file
        ResumeFiles(
            latest,
            "HF Trainer full-parameter",
            frozenset(latest / name for name in trajectory.latest.files),
            TRAINER_WEIGHTLESS,
            "HF Trainer checkpoint-N/ folders whose weights are model*.safetensors (no DeepSpeed or FSDP states)",
        )
    )
    extra = sorted(p.name for p in latest.iterdir() if p.is_dir())
    if extra:
        return (
            f"{latest}: --resumable for full-parameter runs rewrites model weights only, but {extra} may hold weights "
            "the trainer resumes from (DeepSpeed/FSDP states); drop --resumable and load the model folder instead"
        )
    return None


def _write_resumable(trajectory: DenseTrajectory, tmp: Path) -> dict[str, Any]:
    """``resume/checkpoint-N/``: the latest checkpoint with its model weight files replaced."""
    latest = trajectory.latest
    target = tmp / RESUME_DIR / latest.folder.name
    for child in sorted(latest.folder.iterdir()):
        source = tmp / child.name if child.name in latest.files else child
        copy_file(source, target / child.name)
    return {
        "checkpoint_dir": str(target.relative_to(tmp)),
        "command": f"trainer.train(resume_from_checkpoint='<out>/{RESUME_DIR}/{latest.folder.name}')",
        "notes": [
            f"the resumed run continues at step {latest.step} (optimizer, scheduler, RNG and trainer state of the last real "
            "checkpoint); only the model weights are extrapolated"
        ],
    }


def _header_record(checkpoint: DenseCheckpoint) -> list[dict[str, Any]]:
    out = []
    for name in checkpoint.files:
        path = checkpoint.folder / name
        with path.open("rb") as handle:
            header = handle.read(checkpoint.header_bytes[name])
        out.append({"path": str(path), "size": path.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()})
    return out


def _manifest(trajectory: DenseTrajectory, choice: DenseChoice, warning: str | None, command: str, world: int) -> dict[str, Any]:
    return {
        "tool": "nextoffline",
        "version": __version__,
        "command": command,
        "kind": "full-parameter",
        "source": {
            "label": trajectory.source_label,
            "format": trajectory.layout,
            "steps": trajectory.step_numbers,
            "reference": str(trajectory.base.folder) if trajectory.base else trajectory.step_numbers[0],
            "files": [{"step": c.step, "files": _header_record(c)} for c in trajectory.checkpoints]
            + ([{"step": "base", "files": _header_record(trajectory.base)}] if trajectory.base else []),
        },
        "extrapolation": {
            "method": choice.method or "none",
            "target_step": choice.target_step,
            "coef": choice.coef,
            "horizon": choice.horizon,
            "horizon_steps": choice.horizon_steps,
            "note": choice.note,
        },
        "backtest": choice.backtest.to_json() if choice.backtest else None,
        "warnings": [warning] if warning else [],
        "processes": world,
    }


@dataclass(frozen=True)
class DenseRequest:
    """What :func:`run_dense_extrapolate` was asked to do (the CLI options of ``extrapolate``)."""

    out_dir: Path
    chunk_bytes: int
    method: str = "auto"
    coefs: tuple[float, ...] = ()
    to_steps: tuple[float, ...] = ()
    holdout: int = 2
    horizon: int | None = None
    resumable: bool = False
    overwrite: bool = False
    command: str = "api"
    progress: bool = False


def run_dense_extrapolate(
    trajectory: DenseTrajectory,
    *,
    device: torch.device,
    chunk_bytes: int,
    out_dir: Path,
    method: str = "auto",
    coefs: list[float] | None = None,
    to_steps: list[float] | None = None,
    holdout: int = 2,
    horizon: int | None = None,
    resumable: bool = False,
    overwrite: bool = False,
    command: str = "api",
    progress: bool = False,
) -> dict[str, Any]:
    """Read, select, and write the extrapolated model (one process, or every rank of a ``torchrun`` job).

    Returns the summary (the manifest, plus ``out``); identical on every rank.
    """
    request = DenseRequest(
        out_dir, chunk_bytes, method, tuple(coefs or ()), tuple(to_steps or ()), holdout, horizon, resumable, overwrite, command, progress
    )
    group = init_from_env(device)
    try:
        return _run(trajectory, group, request)
    finally:
        group.close()


def _validate(trajectory: DenseTrajectory, request: DenseRequest) -> None:
    sources = (trajectory.source, *(c.folder for c in trajectory.checkpoints))
    check_output_location(request.out_dir, sources=sources, overwrite=request.overwrite)
    refusal = _resumable_refusal(trajectory) if request.resumable else None
    if refusal:
        raise OutputError(refusal)


def _run(trajectory: DenseTrajectory, group: Group, request: DenseRequest) -> dict[str, Any]:
    group.main_first(lambda: _validate(trajectory, request))
    stats = collect_stats(trajectory, group.device, request.chunk_bytes, group, progress=request.progress)
    warning = resolution_warning(trajectory, stats)
    if warning and group.is_main:
        LOG.warning(warning)
    choice = select_predictor(
        trajectory,
        stats,
        method=request.method,
        coefs=request.coefs,
        to_steps=request.to_steps,
        holdout=request.holdout,
        horizon=request.horizon,
    )
    if group.is_main and choice.note:
        LOG.info(choice.note)
    manifest = _manifest(trajectory, choice, warning, request.command, group.world)
    required = trajectory.total_bytes() * (2 if request.resumable else 1)
    writer = AtomicOutputDir(request.out_dir, overwrite=request.overwrite, required_bytes=required) if group.is_main else None
    tmp = group.main_first(writer.__enter__ if writer is not None else Path)  # only rank 0 calls it
    try:
        if group.is_main:
            _create_weight_files(trajectory.latest, tmp)
            manifest["copied_files"] = _copy_model_files(trajectory.latest, tmp)
        group.barrier()
        write_extrapolated_model(
            trajectory, choice, stats, tmp, group, device=group.device, budget=request.chunk_bytes, progress=request.progress
        )
        group.barrier()
        if group.is_main:
            if request.resumable:
                manifest["resumable"] = _write_resumable(trajectory, tmp)
            write_json(tmp / MANIFEST_NAME, manifest)
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    group.barrier()
    return {**manifest, "out": str(request.out_dir)}
