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
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextoffline import __version__
from nextoffline.artifacts import CANDIDATES_DIR, EVAL_LOG_DIR, MANIFEST_NAME, RESUME_DIR
from nextoffline.dense.dist import Group, init_from_env
from nextoffline.dense.evaluate import evaluate_candidates
from nextoffline.dense.layout import DenseCheckpoint, DenseResume, DenseTrajectory, WriteTarget, reader_of
from nextoffline.dense.model_folder import ModelFolderPlan, copy_model_files, plan_model_folder
from nextoffline.dense.next import DenseNext
from nextoffline.dense.pipeline import DenseStats, WriteJob, collect_stats, resolution_warning, write_extrapolated_model
from nextoffline.dense.select import DenseCandidate, DenseChoice, next_in_auto, select_predictor
from nextoffline.errors import OutputError, UsageError
from nextoffline.evaluation import EvalSpec
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files
from nextoffline.formats.trl import TRAINER_WEIGHTLESS
from nextoffline.io.writer import AtomicOutputDir, check_output_location, copy_file, write_json
from nextoffline.ops.predictors import NextOptions, parse_predictor_name
from nextoffline.pipeline import default_horizon

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
    """The manifest fields every folder of one run shares (``selected``/``candidates`` are added per folder)."""
    return {
        "tool": "nextoffline",
        "version": __version__,
        "command": command,
        "kind": "full-parameter",
        "source": {
            "label": trajectory.source_label,
            "format": trajectory.layout,
            "steps": trajectory.step_numbers,
            "reference": trajectory.reference_label if trajectory.base else trajectory.step_numbers[0],
            "files": [{"step": c.step, "files": _header_record(c)} for c in trajectory.checkpoints]
            + ([{"step": "base", "files": _header_record(trajectory.base)}] if trajectory.base else []),
        },
        "extrapolation": {
            **choice.details,
            "method": choice.method or "none",
            "horizon": choice.horizon,
            "horizon_steps": choice.horizon_steps,
            "backtest": choice.backtest.to_json() if choice.backtest else None,
            "note": choice.note,
        },
        "backtest": choice.backtest.to_json() if choice.backtest else None,
        "warnings": [warning] if warning else [],
        "processes": world,
    }


def _candidate_record(candidate: DenseCandidate, folder: str) -> dict[str, Any]:
    return {"label": candidate.label, "step": candidate.target_step, "coef": candidate.coef, "adapter": folder}


def _folder_manifest(
    shared: dict[str, Any],
    selected: dict[str, Any],
    candidates: list[dict[str, Any]] | None = None,
    *,
    lower_is_better: bool | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """The manifest of one model folder: the shared fields plus its own candidate (``selected``)
    and, for the folder that lists a sweep, every candidate (readable by :class:`~nextoffline.artifacts.Manifest`)."""
    extrapolation = dict(shared["extrapolation"], target_step=selected.get("step"), coef=selected.get("coef"))
    if note is not None:
        extrapolation["note"] = note
    out = dict(shared, extrapolation=extrapolation, selected=selected)
    if candidates is not None:
        out["candidates"] = candidates
    if lower_is_better is not None:
        out["lower_is_better"] = lower_is_better
    return out


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
    evaluation: EvalSpec | None = None
    next_options: NextOptions = field(default_factory=NextOptions)
    next_budget_s: float = 120.0


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
    evaluation: EvalSpec | None = None,
    next_options: NextOptions | None = None,
    next_budget_s: float = 120.0,
) -> dict[str, Any]:
    """Read, select, and write the extrapolated model(s) (one process, or every rank of a ``torchrun`` job).

    One target: ``out_dir`` is the HF model folder. Several (``coefs``/``to_steps`` lists): one
    model folder per candidate, ``out_dir/<label>/`` (the LoRA sweep's names), and
    ``out_dir/nextoffline.json`` lists them. With ``evaluation``: coefficient 0 is added as the
    reference, every candidate is scored, ``out_dir`` is the best one (``candidates/`` keeps the
    others with ``keep_all``, ``eval_logs/`` the evaluator's output). Every slab of the
    trajectory is read once, whatever the number of candidates. ``method="next"`` trains NExt
    (``next_options``) on the triplets of the 2-D tensors; ``auto`` includes it when its projected
    training time fits ``next_budget_s`` (``--next-budget``).

    Returns the summary (the output folder's manifest, plus ``out``); on every rank the same,
    except that only rank 0 holds the evaluator's scores.
    """
    coef_list = [float(c) for c in coefs or ()]
    if evaluation is not None and not any(c == 0 for c in coef_list):
        coef_list = [0.0, *coef_list]  # the reference: no extrapolation (wins ties)
    request = DenseRequest(
        out_dir,
        chunk_bytes,
        method,
        tuple(coef_list),
        tuple(to_steps or ()),
        holdout,
        horizon,
        resumable,
        overwrite,
        command,
        progress,
        evaluation,
        next_options or NextOptions(),
        next_budget_s,
    )
    group = init_from_env(device)
    try:
        return _run(trajectory, group, request)
    finally:
        group.close()


def _validate(trajectory: DenseTrajectory, request: DenseRequest) -> DenseResume | None:
    sources = (trajectory.source, *(c.folder for c in trajectory.checkpoints))
    if request.resumable and request.evaluation is None and len(request.coefs) + len(request.to_steps) > 1:
        raise UsageError("--resumable needs one target, or --eval-cmd to pick the best candidate")
    check_output_location(request.out_dir, sources=sources, overwrite=request.overwrite)
    return reader_of(trajectory).resumable(trajectory) if request.resumable else None


def _next_horizon(trajectory: DenseTrajectory, request: DenseRequest, ctx: DenseNext) -> tuple[int | None, str]:
    """The horizon NExt's triplets are computed for in the statistics pass (``None``: not needed),
    and why ``auto`` leaves NExt out when it does."""
    horizon = request.horizon or default_horizon(len(trajectory.checkpoints))
    if request.method != "auto":
        return (horizon if parse_predictor_name(request.method)[0] == "next" else None), ""
    included, why = next_in_auto(trajectory, ctx, holdout=request.holdout, horizon=horizon)
    if why and ctx.group.is_main:
        LOG.warning(why)
    return (horizon if included else None), why


def _folders(choice: DenseChoice, request: DenseRequest) -> list[str]:
    """Each candidate's folder inside the output: itself (one target), ``<label>`` (a sweep),
    ``candidates/<label>`` (scored; the best moves up to the output folder)."""
    if request.evaluation is not None:
        return [f"{CANDIDATES_DIR}/{c.label}" for c in choice.candidates]
    if len(choice.candidates) == 1:
        return [""]
    return [c.label for c in choice.candidates]


def _run(trajectory: DenseTrajectory, group: Group, request: DenseRequest) -> dict[str, Any]:
    resume = group.main_first(lambda: _validate(trajectory, request))
    ctx = DenseNext(group, group.device, request.chunk_bytes, request.next_options, request.next_budget_s)
    next_horizon, skipped = _next_horizon(trajectory, request, ctx)
    stats = collect_stats(trajectory, group.device, request.chunk_bytes, group, progress=request.progress, next_horizon=next_horizon)
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
        next_ctx=ctx if next_horizon is not None else None,
    )
    if skipped:
        choice.note = f"{skipped}; {choice.note}" if choice.note else skipped
    if group.is_main and choice.note:
        LOG.info(choice.note)
    shared = _manifest(trajectory, choice, warning, request.command, group.world)
    plan = plan_model_folder(trajectory)
    folders = _folders(choice, request)
    # the resume copy is written with the single target in the same pass; a scored sweep writes it once selected
    resume_now = resume if resume is not None and request.evaluation is None else None
    jobs = [WriteJob(c.weights, (plan.target(f),), c.rank1) for c, f in zip(choice.candidates, folders)]
    if resume_now is not None:
        jobs[0] = WriteJob(jobs[0].weights, (*jobs[0].targets, *resume_now.targets), jobs[0].rank1)
    required = plan.total_bytes * len(folders) + (_folder_bytes(resume.copy_from) if resume else 0)
    writer = AtomicOutputDir(request.out_dir, overwrite=request.overwrite, required_bytes=required) if group.is_main else None
    tmp = group.main_first(writer.__enter__ if writer is not None else Path)  # only rank 0 calls it
    try:
        copied = group.main_first(lambda: _create_candidates(trajectory, plan, tmp, folders, resume_now))
        write_extrapolated_model(
            trajectory, jobs, stats, tmp, group, device=group.device, budget=request.chunk_bytes, progress=request.progress
        )
        group.barrier()
        if group.is_main:
            summary = _finish(trajectory, choice, dict(shared, copied_files=copied), tmp, folders, request, (stats, group.device), resume)
        else:
            summary = dict(shared)
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    if request.evaluation is None or group.world == 1:  # under torchrun the other ranks do not wait for a (long) evaluation
        group.barrier()
    return {**summary, "out": str(request.out_dir)}


def _create_candidates(
    trajectory: DenseTrajectory, plan: ModelFolderPlan, tmp: Path, folders: list[str], resume: DenseResume | None
) -> list[str]:
    """Rank 0: every candidate folder with its weight files created and the model files copied (and the resume copy)."""
    copied: list[str] = []
    for folder in folders:
        target = tmp / folder
        target.mkdir(parents=True, exist_ok=True)
        plan.create(target)
        copied = copy_model_files(trajectory.model_files_dir or trajectory.latest.folder, target, plan)
    if resume is not None:
        _copy_tree(resume.copy_from, tmp / resume.copy_to)
    return copied


def _finish(
    trajectory: DenseTrajectory,
    choice: DenseChoice,
    shared: dict[str, Any],
    tmp: Path,
    folders: list[str],
    request: DenseRequest,
    computed: tuple[DenseStats, torch.device],
    resume: DenseResume | None,
) -> dict[str, Any]:
    """Rank 0, after every rank wrote: evaluate, write the manifests (and a scored run's resume copy).

    Returns the output folder's manifest.
    """
    records = [_candidate_record(c, f or ".") for c, f in zip(choice.candidates, folders)]
    if request.evaluation is not None:
        manifest, best = _evaluated(choice, shared, tmp, records, request.evaluation)
        if resume is not None:
            _write_selected_resume(trajectory, choice.candidates[best], computed, tmp, resume, request.chunk_bytes)
    elif len(folders) == 1:
        manifest = _folder_manifest(shared, records[0])
    else:
        for folder, record in zip(folders, records):
            write_json(tmp / folder / MANIFEST_NAME, _folder_manifest(shared, record))
        manifest = _folder_manifest(shared, {}, records)
    if resume is not None:
        if resume.finalize is not None:  # once, after every write into the resume copy
            resume.finalize(tmp / resume.copy_to)
        manifest["resumable"] = resume.info
    write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def _write_selected_resume(
    trajectory: DenseTrajectory,
    selected: DenseCandidate,
    computed: tuple[DenseStats, torch.device],
    tmp: Path,
    resume: DenseResume,
    budget: int,
) -> None:
    """``--resumable`` with ``--eval-cmd``: the trainer's checkpoint with the selected candidate's
    weights (one more pass over the trajectory, on rank 0: the candidate is known only now)."""
    _copy_tree(resume.copy_from, tmp / resume.copy_to)
    job = WriteJob(selected.weights, tuple(resume.targets), selected.rank1)
    stats, device = computed
    alone = Group(device=device)
    write_extrapolated_model(trajectory, [job], stats, tmp, alone, device=device, budget=budget)


def _evaluated(
    choice: DenseChoice, shared: dict[str, Any], tmp: Path, records: list[dict[str, Any]], spec: EvalSpec
) -> tuple[dict[str, Any], int]:
    """Score the candidates, keep the best as the output folder; the manifests record every score."""
    log_dir = Path(tempfile.mkdtemp(prefix="nextoffline-eval-logs-"))  # survives a failure, for the message's log path
    scores = evaluate_candidates(tmp, choice.candidates, spec, log_dir, unchanged=choice.method is None)
    shutil.copytree(log_dir, tmp / EVAL_LOG_DIR)
    shutil.rmtree(log_dir, ignore_errors=True)
    records = [dict(r, **s) for r, s in zip(records, scores.records)]
    note = f"{choice.note}; {scores.note}" if choice.note else scores.note
    lower = spec.lower_is_better
    for i, record in enumerate(records):
        if i != scores.best and record["adapter"] is not None:
            own = dict(record, note=f"not selected: {records[scores.best]['label']} scored best")
            write_json(tmp / record["adapter"] / MANIFEST_NAME, _folder_manifest(shared, own, records, lower_is_better=lower, note=note))
    return _folder_manifest(shared, records[scores.best], records, lower_is_better=lower, note=note), scores.best
