"""Persist extrapolations: PEFT adapter folders, manifest, model card, resumable checkpoints.

Names, the manifest and the card are :mod:`nextoffline.artifacts`'; this module fills them
from an :class:`~nextoffline.pipeline.Extrapolation`. Everything is written into one temporary
folder that is moved into place at the end (:class:`~nextoffline.io.writer.AtomicOutputDir`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from nextoffline import __version__
from nextoffline.artifacts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    RESUME_DIR,
    Manifest,
    candidate_label,
    read_manifest,
    write_manifest,
)
from nextoffline.formats import get_format
from nextoffline.formats.base import write_resumable_checked
from nextoffline.io.writer import AtomicOutputDir, check_output_location, write_safetensors
from nextoffline.pipeline import Candidate, Extrapolation
from nextoffline.types import ResumeInfo, Trajectory

__all__ = [
    "build_manifest",
    "candidate_labels",
    "candidate_record",
    "extrapolation_record",
    "output_sources",
    "save_extrapolation",
    "source_record",
    "write_adapter_folder",
]

LOG = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """SHA-256 of every file, one thread per core (hashing releases the GIL; it is CPU-bound)."""
    workers = max(1, min(len(paths), os.cpu_count() or 1))
    if workers == 1:
        return [_sha256(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_sha256, paths))


def source_record(trajectory: Trajectory) -> dict[str, Any]:
    """Where the trajectory came from, with a hash of every file read."""
    configs = [ref.adapter_dir / ADAPTER_CONFIG_NAME for ref in trajectory.steps]
    weight_hashes = _sha256_all([ref.weights_file for ref in trajectory.steps])
    return {
        "label": trajectory.source_label,
        "format": trajectory.format_name,
        "steps": trajectory.step_numbers,
        "files": [
            {
                "step": ref.step,
                "weights": str(ref.weights_file),
                "weights_sha256": weights_sha256,
                "config_sha256": _sha256(config) if config.is_file() else None,
            }
            for ref, config, weights_sha256 in zip(trajectory.steps, configs, weight_hashes)
        ],
    }


def output_sources(trajectory: Trajectory) -> tuple[Path, ...]:
    """Folders an output must not be written into or over (the source and every step's checkpoint)."""
    return (trajectory.source, *(ref.checkpoint_dir for ref in trajectory.steps))


def candidate_labels(extrapolation: Extrapolation) -> list[str]:
    """Folder name of every candidate (:func:`~nextoffline.artifacts.candidate_label`), e.g. ``coef_1.5``, ``step_120``."""
    return [candidate_label(c.coef, c.target_step, by_step=c.by_step) for c in extrapolation.candidates]


def build_manifest(
    trajectory_source: Mapping[str, Any],
    extrapolation: Extrapolation,
    record: Mapping[str, Any],
    *,
    command: str,
    candidates: list[Mapping[str, Any]] | None = None,
    lower_is_better: bool | None = None,
) -> Manifest:
    """The manifest of one adapter folder of ``extrapolation`` (``record``: its candidate)."""
    return Manifest(
        version=__version__,
        command=command,
        source=dict(trajectory_source),
        extrapolation=extrapolation_record(extrapolation),
        selected=dict(record),
        candidates=[dict(c) for c in candidates] if candidates is not None else None,
        lower_is_better=lower_is_better,
    )


#: Manifest key -> :class:`~nextoffline.pipeline.Candidate` attribute.
_CANDIDATE_FIELDS = {
    "step": "target_step",
    "coef": "coef",
    "kept_energy": "kept_energy_mean",
    "kept_energy_min": "kept_energy_min",
    "relative_update": "relative_update",
    "gauge_resets": "gauge_resets",
}


def candidate_record(candidate: Candidate) -> dict[str, Any]:
    """The manifest record of one candidate (its numbers, not its tensors)."""
    return {key: getattr(candidate, attr) for key, attr in _CANDIDATE_FIELDS.items()}


def extrapolation_record(extrapolation: Extrapolation) -> dict[str, Any]:
    return {
        "method": extrapolation.method,
        "predictor_settings": extrapolation.predictor_settings,
        "horizon_checkpoints": extrapolation.horizon,
        "horizon_steps": extrapolation.horizon_steps,
        "rank_policy": extrapolation.rank_policy,
        "backtest": extrapolation.backtest.to_json() if extrapolation.backtest else None,
        "forecast": extrapolation.forecast,
        "note": extrapolation.note,
    }


def grown_config(config: Mapping[str, Any], trajectory: Trajectory, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Adapter config for rank-grown factors, with the scaling of every module unchanged."""
    new = copy.deepcopy(dict(config))
    ranks = {m.name: int(tensors[m.a_key].shape[0]) for m in trajectory.modules}
    alphas = {m.name: m.scaling * (math.sqrt(ranks[m.name]) if config.get("use_rslora") else ranks[m.name]) for m in trajectory.modules}
    if (
        len(set(ranks.values())) == 1
        and len(set(alphas.values())) == 1
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
    ):
        new["r"], new["lora_alpha"] = next(iter(ranks.values())), next(iter(alphas.values()))
        return new
    new["rank_pattern"] = {_pattern(name): rank for name, rank in ranks.items()}
    new["alpha_pattern"] = {_pattern(name): alpha for name, alpha in alphas.items()}
    return new


def _pattern(module: str) -> str:
    return "^" + module.removeprefix("base_model.model.").replace(".", r"\.")


def write_adapter_folder(
    folder: Path, trajectory: Trajectory, extrapolation: Extrapolation, candidate: Candidate, manifest: Manifest
) -> None:
    """One PEFT adapter folder: config, weights, manifest, card."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(trajectory.adapter_config)
    if extrapolation.rank_policy == "grow":
        config = grown_config(config, trajectory, candidate.tensors)
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    metadata = {
        "format": "pt",
        "nextoffline_version": __version__,
        "source_steps": json.dumps(trajectory.step_numbers),
        "predicted_step": f"{candidate.target_step:g}",
        "coefficient": f"{candidate.coef:g}",
    }
    write_safetensors(folder / ADAPTER_WEIGHTS_NAME, candidate.tensors, metadata)
    write_manifest(folder, manifest)


def _adapter_bytes(trajectory: Trajectory) -> int:
    """Bytes of one written adapter: its LoRA factors in their stored dtype (plus passthrough tensors).

    Not the size of ``latest.weights_file``: for verl shards that file is rank 0's whole model shard.
    """
    lora = 0
    for module in trajectory.modules:
        itemsize = torch.empty((), dtype=getattr(torch, trajectory.dtypes.get(module.a_key, "float32"))).element_size()
        lora += (module.out_features + module.in_features) * module.rank * itemsize
    weights = trajectory.latest.weights_file
    if trajectory.passthrough_keys or not lora:  # passthrough tensors are copied from the weight file
        lora = max(lora, weights.stat().st_size)
    return lora + 64 * 1024  # safetensors header, config, manifest, card


def _required_bytes(trajectory: Trajectory, count: int, resumable: bool) -> int:
    weights = _adapter_bytes(trajectory)
    extra = sum(p.stat().st_size for p in trajectory.latest.checkpoint_dir.rglob("*") if p.is_file()) if resumable else 0
    return count * weights + extra


def save_extrapolation(
    out_dir: Path,
    trajectory: Trajectory,
    extrapolation: Extrapolation,
    *,
    command: str,
    resumable: bool = False,
    overwrite: bool = False,
    scores: Mapping[int, Mapping[str, Any]] | None = None,
    keep: list[int] | None = None,
    extra_dirs: Mapping[str, Path] | None = None,
    lower_is_better: bool | None = None,
    source: Mapping[str, Any] | None = None,
    location_checked: bool = False,
) -> tuple[Path, ResumeInfo | None]:
    """Write the extrapolation atomically under ``out_dir``.

    One kept candidate: ``out_dir`` is the adapter folder. Several: one subfolder each, named
    by :func:`candidate_labels`. ``resumable`` adds ``out_dir/resume/`` in the source
    trainer's layout, built from the single kept candidate. ``location_checked``: the caller
    already ran :func:`~nextoffline.io.writer.check_output_location` (before its compute).
    """
    keep = list(range(len(extrapolation.candidates))) if keep is None else keep
    if not location_checked:
        check_output_location(out_dir, sources=output_sources(trajectory), overwrite=overwrite)
    source = source if source is not None else source_record(trajectory)
    labels = candidate_labels(extrapolation)
    records = [dict(candidate_record(c), **(scores or {}).get(i, {})) for i, c in enumerate(extrapolation.candidates)]
    all_records = records if scores else None
    resume_info = None
    with AtomicOutputDir(out_dir, overwrite=overwrite, required_bytes=_required_bytes(trajectory, len(keep), resumable)) as tmp:
        for index in keep:
            candidate = extrapolation.candidates[index]
            folder = tmp if len(keep) == 1 else tmp / labels[index]
            manifest = build_manifest(
                source, extrapolation, records[index], command=command, candidates=all_records, lower_is_better=lower_is_better
            )
            write_adapter_folder(folder, trajectory, extrapolation, candidate, manifest)
        if resumable and len(keep) == 1:
            resume_info = finish_resumable(tmp, trajectory)
        for name, folder in (extra_dirs or {}).items():
            shutil.copytree(folder, tmp / name)
    if resume_info is not None:
        resume_info = ResumeInfo(
            out_dir / resume_info.checkpoint_dir.relative_to(tmp), resume_info.command.replace(str(tmp), str(out_dir)), resume_info.notes
        )
    return out_dir, resume_info


def finish_resumable(tmp: Path, trajectory: Trajectory) -> ResumeInfo:
    """Run the source format's writer against the adapter already written in ``tmp``."""
    fmt = get_format(trajectory.format_name)
    target = tmp / RESUME_DIR
    target.mkdir()
    info = write_resumable_checked(fmt, trajectory.latest, tmp, target)  # refuses unhandled weight files
    resume = {
        "format": fmt.name,
        "checkpoint_dir": str(info.checkpoint_dir.relative_to(tmp)),
        "command": info.command,
        "notes": list(info.notes),
    }
    write_manifest(tmp, read_manifest(tmp).with_resume(resume))
    return info
