"""Write an extrapolated full-parameter model: an HF model folder, manifest, optional resumable checkpoint.

The output folder's weight files follow :func:`~nextoffline.dense.model_folder.plan_model_folder`
(the latest checkpoint's safetensors files mirrored, or fresh HF shards), plus the config,
generation config and tokenizer files; trainer state stays out. With ``--resumable`` the
trainer's own checkpoint is copied to ``resume/`` and its weights (and fp32 masters where the
trainer keeps them) are overwritten in the same write pass (the layout's
:meth:`~nextoffline.dense.layout.DenseReader.resumable` plan). Rank 0 creates every file at
its full size; each rank then writes its tensors' bytes in place. The whole folder appears
atomically (:class:`~nextoffline.io.writer.AtomicOutputDir`).
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
from nextoffline.dense.layout import DenseCheckpoint, DenseResume, DenseTrajectory, WriteTarget, reader_of
from nextoffline.dense.model_folder import copy_model_files, plan_model_folder
from nextoffline.dense.pipeline import (
    DenseChoice,
    WriteJob,
    collect_stats,
    resolution_warning,
    select_predictor,
    write_extrapolated_model,
)
from nextoffline.errors import OutputError
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files
from nextoffline.formats.trl import TRAINER_WEIGHTLESS
from nextoffline.io.writer import AtomicOutputDir, check_output_location, copy_file, write_json

__all__ = ["DenseRequest", "hf_trainer_resume", "run_dense_extrapolate"]

LOG = logging.getLogger(__name__)


def hf_trainer_resume(trajectory: DenseTrajectory) -> DenseResume:
    """``resume/checkpoint-N/``: a copy of the latest HF Trainer checkpoint with its model weights
    replaced (optimizer, scheduler, RNG and trainer state are the last real checkpoint's).

    Raises:
        OutputError: plain step folders, or subfolders that may hold DeepSpeed/FSDP states.
        UnhandledCheckpointError: a weight-bearing file it would copy unchanged (no-silent-loss rule).
    """
    latest = trajectory.latest
    folder = latest.folder
    if trajectory.layout != "hf-trainer":
        raise OutputError(f"{trajectory.source}: --resumable needs HF Trainer checkpoint-N/ folders; this run has plain step folders")
    check_resume_files(  # the no-silent-loss rule of every --resumable writer: refuses naming the file
        ResumeFiles(
            folder,
            "HF Trainer full-parameter",
            frozenset(folder / name for name in latest.files),
            TRAINER_WEIGHTLESS,
            "HF Trainer checkpoint-N/ folders whose weights are model*.safetensors (no DeepSpeed or FSDP states)",
        )
    )
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if extra:
        raise OutputError(
            f"{folder}: --resumable for full-parameter runs rewrites model weights only, but {extra} may hold weights "
            "the trainer resumes from (DeepSpeed/FSDP states); drop --resumable and load the model folder instead"
        )
    target = f"{RESUME_DIR}/{folder.name}"
    return DenseResume(
        copy_from=folder,
        copy_to=target,
        targets=[WriteTarget(target, latest.entries)],
        info={
            "checkpoint_dir": target,
            "command": f"trainer.train(resume_from_checkpoint='<out>/{target}')",
            "notes": [
                f"the resumed run continues at step {latest.step} (optimizer, scheduler, RNG and trainer state of the last real "
                "checkpoint); only the model weights are extrapolated"
            ],
        },
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _copy_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            copy_file(path, target / path.relative_to(source))


#: bytes hashed at the start of a weight file that has no safetensors header (a torch zip's directory is at its end)
_HASHED_PREFIX = 1 << 20


def _header_record(checkpoint: DenseCheckpoint) -> list[dict[str, Any]]:
    """Per weight file: path, size and the sha256 of its header (safetensors) or first MiB (other files)."""
    out = []
    for name in checkpoint.files:
        path = checkpoint.folder / name
        with path.open("rb") as handle:
            header = handle.read(checkpoint.header_bytes.get(name, _HASHED_PREFIX))
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


def _validate(trajectory: DenseTrajectory, request: DenseRequest) -> DenseResume | None:
    sources = (trajectory.source, *(c.folder for c in trajectory.checkpoints))
    check_output_location(request.out_dir, sources=sources, overwrite=request.overwrite)
    return reader_of(trajectory).resumable(trajectory) if request.resumable else None


def _run(trajectory: DenseTrajectory, group: Group, request: DenseRequest) -> dict[str, Any]:
    resume = group.main_first(lambda: _validate(trajectory, request))
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
    plan = plan_model_folder(trajectory)
    job = WriteJob(choice.weights, (plan.target(), *(resume.targets if resume else ())))
    required = plan.total_bytes + (_folder_bytes(resume.copy_from) if resume else 0)
    writer = AtomicOutputDir(request.out_dir, overwrite=request.overwrite, required_bytes=required) if group.is_main else None
    tmp = group.main_first(writer.__enter__ if writer is not None else Path)  # only rank 0 calls it
    try:
        if group.is_main:
            plan.create(tmp)
            manifest["copied_files"] = copy_model_files(trajectory.model_files_dir or trajectory.latest.folder, tmp, plan)
            if resume is not None:
                _copy_tree(resume.copy_from, tmp / resume.copy_to)
        group.barrier()
        write_extrapolated_model(
            trajectory, [job], stats, tmp, group, device=group.device, budget=request.chunk_bytes, progress=request.progress
        )
        group.barrier()
        if group.is_main:
            if resume is not None:
                if resume.finalize is not None:
                    resume.finalize(tmp / resume.copy_to)
                manifest["resumable"] = resume.info
            write_json(tmp / MANIFEST_NAME, manifest)
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    group.barrier()
    return {**manifest, "out": str(request.out_dir)}
