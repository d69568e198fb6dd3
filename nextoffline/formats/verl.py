"""verl run folders (``trainer.default_local_dir``): ``global_step_N/actor/`` FSDP checkpoints.

Per saved step verl writes ``global_step_N/actor/model_world_size_W_rank_R.pt`` (one FSDP shard
per rank: a state dict of ``DTensor`` values, LoRA keys ``...lora_A.default.weight``), the
optimizer and extra-state shards, ``huggingface/`` (config, tokenizer) and ``fsdp_config.json``;
``global_step_N/data.pt`` holds the dataloader state and ``latest_checkpointed_iteration.txt``
the newest step. verl <= 0.7 (legacy FSDP workers) also writes a PEFT adapter to
``actor/lora_adapter/``; verl 0.9 writes ``actor/lora_train_meta.json`` (rank, alpha) instead.

On resume verl loads the LoRA weights only from the ``model_world_size_W_rank_R.pt`` shards, so
:meth:`VerlFormat.write_resumable` rewrites the LoRA tensors inside every shard (in place:
same storage, dtype, shard slice and key; nothing else in the file changes), refreshes
``lora_adapter/`` when present, and copies every other file. See ``docs/formats.md``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from nextoffline.errors import AdapterConfigError, AdapterFileError, FormatDetectionError
from nextoffline.formats.base import register_format
from nextoffline.formats.lora_keys import checked_new_weights, is_peft_lora_key, match_lora_key, peft_key, rewrite_safetensors
from nextoffline.formats.resume_files import ResumeFiles
from nextoffline.io.reader import register_state_loader
from nextoffline.io.safetensors_header import read_safetensors_header
from nextoffline.io.torch_zip import Opaque, SubclassRef, TensorRef, patch_tensors, read_structure, read_tensors, state_of
from nextoffline.types import ResumeInfo, StepRef

__all__ = [
    "ShardEntry",
    "VerlFormat",
    "adapter_config_from_shards",
    "is_verl_model_shard",
    "load_lora_state",
    "model_shards",
    "shard_tensors",
]

LOG = logging.getLogger(__name__)

TRACKER_NAME = "latest_checkpointed_iteration.txt"
LEGACY_ADAPTER_DIR = "lora_adapter"
LORA_META_NAME = "lora_train_meta.json"
#: Files of ``global_step_N/`` copied unchanged: no actor weights are loaded from them on resume
#: (``huggingface/`` full weights are written with ``save_contents: hf_model`` but never loaded;
#: the critic is not extrapolated).
VERL_WEIGHTLESS = (
    "data.pt",
    "actor/optim_world_size_*_rank_*.pt",
    "actor/extra_state_world_size_*_rank_*.pt",
    "actor/huggingface/*",
    "critic/*",
)
_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_MODEL_SHARD = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def is_verl_model_shard(path: Path) -> bool:
    """True for ``model_world_size_W_rank_R.pt`` files."""
    return _MODEL_SHARD.match(path.name) is not None


def model_shards(actor_dir: Path) -> list[Path]:
    """Every ``model_world_size_W_rank_R.pt`` of one step, ordered by rank; all W ranks must exist."""
    found: dict[int, dict[int, Path]] = {}
    for path in actor_dir.glob("model_world_size_*_rank_*.pt"):
        match = _MODEL_SHARD.match(path.name)
        if match:
            found.setdefault(int(match[1]), {})[int(match[2])] = path
    if not found:
        return []
    if len(found) > 1:
        raise AdapterFileError(f"{actor_dir}: shards of several world sizes {sorted(found)}; keep the files of one run")
    ((world, ranks),) = found.items()
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise AdapterFileError(f"{actor_dir}: model shards of ranks {missing} are missing (world size {world}); copy every rank's file")
    return [ranks[r] for r in range(world)]


# --------------------------------------------------------------------------- DTensor shards


@dataclass(frozen=True)
class ShardEntry:
    """One parameter as stored in one rank's shard file (a DTensor's local block, or a plain tensor)."""

    state_key: str
    ref: TensorRef
    global_shape: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]  # [start, end) of the local block in every dimension


def _placements(path: Path, key: str, spec: dict[str, Any]) -> list[tuple[str, int]]:
    result = []
    for placement in spec.get("placements", ()):
        kind = getattr(placement, "path", "").rsplit(".", 1)[-1]
        if kind == "Shard":
            result.append(("shard", int(state_of(placement)["dim"])))
        elif kind == "Replicate":
            result.append(("replicate", 0))
        else:
            raise AdapterFileError(f"{path}: {key} has placement {kind}; only Shard/Replicate FSDP checkpoints are supported")
    return result


def _mesh_geometry(path: Path, mesh: Any, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(mesh shape, coordinate of this file's rank)`` for torch 2.4+ (``mesh``) and 2.9+ (``_layout``) pickles."""
    state = state_of(mesh)
    shape: tuple[int, ...] | None = None
    ranks: list[int] | None = None
    if isinstance(state.get("mesh"), TensorRef):  # older torch: the mesh tensor itself
        shape = state["mesh"].size
        (grid,) = read_tensors(path, [state["mesh"]])
        ranks = [int(r) for r in grid.flatten()]
    else:
        layout = state.get("_layout")
        axes = state_of(layout).get("axes", ()) if isinstance(layout, Opaque) else ()
        sizes = [s for axis in axes for s in state_of(axis).get("shape", ())]
        if sizes:
            shape = tuple(int(s) for s in sizes)
        if isinstance(state.get("_rank_map"), TensorRef):
            (grid,) = read_tensors(path, [state["_rank_map"]])
            ranks = [int(r) for r in grid.flatten()]
    coordinate = state.get("_coordinate_on_dim")
    if shape is None:
        raise AdapterFileError(f"{path}: cannot read the device mesh of the FSDP shards; re-save with the trainer")
    if coordinate is None:
        if ranks is None or rank not in ranks:
            raise AdapterFileError(f"{path}: rank {rank} is not in the device mesh of its shards; keep the file names verl wrote")
        flat, coordinate = ranks.index(rank), []
        for size in reversed(shape):
            coordinate.insert(0, flat % size)
            flat //= size
    return shape, tuple(int(c) for c in coordinate)


def _chunk(start: int, end: int, parts: int, index: int) -> tuple[int, int]:
    """``torch.chunk`` semantics (as DTensor ``Shard`` and FSDP2 use them), empty chunks at the end."""
    length = end - start
    size = -(-length // parts) if length else 0
    lo = min(start + index * size, end)
    return lo, min(lo + size, end)


def _local_bounds(
    global_shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: list[tuple[str, int]], coordinate: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    bounds = [(0, size) for size in global_shape]
    for (kind, dim), parts, index in zip(placements, mesh_shape, coordinate):
        if kind == "shard":
            bounds[dim] = _chunk(*bounds[dim], parts, index)
    return tuple(bounds)


def _shard_entries(path: Path, rank: int, name_of: Callable[[str], str | None] = peft_key) -> dict[str, ShardEntry]:
    """The LoRA parameters of one rank's shard, keyed by their PEFT name (no tensor data read).

    ``name_of`` maps a state-dict key to the name to keep it under (``None``: skip it); the
    full-parameter reader keeps every key under its own name.
    """
    state = read_structure(path)
    if not isinstance(state, dict):
        raise AdapterFileError(f"{path}: expected a state dict, found {type(state).__name__}; re-save with the trainer")
    entries: dict[str, ShardEntry] = {}
    meshes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # the pickle shares one mesh object
    for key, value in state.items():
        name = name_of(str(key))
        if name is None:
            continue
        if isinstance(value, TensorRef):  # unsharded (world size 1 without a mesh)
            entry = ShardEntry(key, value, value.size, tuple((0, s) for s in value.size))
        elif isinstance(value, SubclassRef) and value.cls_path.endswith("DTensor"):
            spec = state_of(value.state.get("_spec"))
            placements = _placements(path, key, spec)
            mesh = spec.get("mesh")
            if id(mesh) not in meshes:
                meshes[id(mesh)] = _mesh_geometry(path, mesh, rank)
            mesh_shape, coordinate = meshes[id(mesh)]
            global_shape = tuple(int(s) for s in value.shell.size)
            bounds = _local_bounds(global_shape, mesh_shape, placements, coordinate)
            entry = ShardEntry(key, value.state["_local_tensor"], global_shape, bounds)
        else:
            raise AdapterFileError(
                f"{path}: {key} is a {type(value).__name__}, not a tensor or DTensor; re-save with FSDP SHARDED_STATE_DICT"
            )
        if tuple(hi - lo for lo, hi in entry.bounds) != entry.ref.size:
            raise AdapterFileError(
                f"{path}: local shard of {key} has shape {entry.ref.size}, expected {entry.bounds}; unsupported FSDP sharding"
            )
        if name in entries:
            raise AdapterFileError(f"{path}: several LoRA adapters ({entries[name].state_key}, {key}); nextoffline handles one adapter")
        entries[name] = entry
    return entries


def shard_tensors(path: Path, rank: int) -> dict[str, ShardEntry]:
    """Every tensor of one rank's ``model_world_size_W_rank_R.pt`` under its state-dict key: the
    stored local tensor, the global shape and the local block's bounds (only the pickle is read)."""
    return _shard_entries(path, rank, name_of=lambda key: key)


def _block(entry: ShardEntry, full: torch.Tensor) -> torch.Tensor:
    index = tuple(slice(lo, hi) for lo, hi in entry.bounds)
    return full[index]


def load_lora_state(weights_file: Path) -> dict[str, torch.Tensor]:
    """Full LoRA tensors (PEFT names, stored dtype) assembled from every rank's shard of one step.

    ``weights_file`` is any ``model_world_size_W_rank_R.pt``; its sibling ranks are read too.
    Only the LoRA tensors are read from disk.
    """
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for rank, shard in enumerate(model_shards(weights_file.parent)):
        entries = _shard_entries(shard, rank)
        values = read_tensors(shard, [e.ref for e in entries.values()])
        if full and set(entries) != set(full):
            raise AdapterFileError(f"{shard}: holds other LoRA keys than rank 0; the shards come from different runs")
        for (name, entry), value in zip(entries.items(), values):
            if name not in full:
                full[name] = torch.empty(entry.global_shape, dtype=value.dtype)
                filled[name] = 0
            _block(entry, full[name]).copy_(value)
            filled[name] += value.numel()
    for name, tensor in full.items():
        if filled[name] < tensor.numel():
            raise AdapterFileError(f"{weights_file.parent}: the shards do not cover all of {name}; copy every rank's file")
    return dict(sorted(full.items()))


register_state_loader(is_verl_model_shard, load_lora_state)


# --------------------------------------------------------------------------- adapter config


def _module_leaf(name: str) -> str:
    """``q_proj`` for ``...self_attn.q_proj.lora_A.weight`` (what verl's merger lists as target modules)."""
    parsed = match_lora_key(name)
    return parsed.module.rsplit(".", 1)[-1] if parsed else name


def adapter_config_from_shards(actor_dir: Path, keys: Iterable[str]) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for a verl 0.9 step: rank and alpha from ``lora_train_meta.json``.

    ``target_modules`` are the module names found in the shards, as verl's own model merger does.
    """
    meta_path = actor_dir / LORA_META_NAME
    if not meta_path.is_file():
        raise AdapterConfigError(
            f"{meta_path}: missing, so lora_alpha is unknown; run `python -m verl.model_merger merge --backend fsdp "
            f"--local_dir {actor_dir} --target_dir DIR` per step and pass the lora_adapter folders with --adapter STEP=PATH"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        rank, alpha = int(meta["r"]), meta["lora_alpha"]
    except (ValueError, KeyError, TypeError):
        raise AdapterConfigError(f"{meta_path}: expected JSON with r and lora_alpha; restore the file verl wrote") from None
    from peft import LoraConfig  # local import: peft is only needed for verl 0.9 layouts

    targets = sorted({_module_leaf(k) for k in keys})
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, task_type=meta.get("task_type") or "CAUSAL_LM").to_dict()
    config = json.loads(json.dumps(config, default=lambda v: getattr(v, "value", sorted(v) if isinstance(v, set) else str(v))))
    config["target_modules"] = targets
    return config


def _check_config_fits(path: Path, config: dict[str, Any], keys: Iterable[str]) -> None:
    """The borrowed config must adapt the modules found in the shards (else it is another run's)."""
    targets = config.get("target_modules")
    if isinstance(targets, list):
        missing = sorted({_module_leaf(k) for k in keys} - set(targets))
        if missing:
            raise AdapterConfigError(
                f"{path}: target_modules {targets} lack {missing} found in the FSDP shards; the config is another run's"
            )


# --------------------------------------------------------------------------- the format


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``global_step_N/`` folders holding an ``actor/`` folder, by step."""
    steps = []
    for child in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(child.name)
        if match and (child / "actor").is_dir():
            steps.append((int(match[1]), child))
    return sorted(steps)


def _has_lora_tensors(path: Path) -> bool:
    """True when a safetensors file holds LoRA tensors (verl <= 0.7 with PEFT >= 0.21 can save an EMPTY adapter)."""
    try:
        header = read_safetensors_header(path)
    except AdapterFileError:  # truncated or corrupt (e.g. still being written): not "empty"; the reader reports it
        return True
    return any(is_peft_lora_key(key) for key in header.tensors)


def _peft_export(folder: Path) -> Path | None:
    """``folder`` when it holds a PEFT adapter with LoRA tensors."""
    if (
        (folder / ADAPTER_CONFIG_NAME).is_file()
        and (folder / ADAPTER_WEIGHTS_NAME).is_file()
        and _has_lora_tensors(folder / ADAPTER_WEIGHTS_NAME)
    ):
        return folder
    return None


def _legacy_adapter(actor_dir: Path) -> Path | None:
    """verl <= 0.7's ``actor/lora_adapter/``, when present and not empty."""
    return _peft_export(actor_dir / LEGACY_ADAPTER_DIR)


def _megatron_adapter(actor_dir: Path) -> Path | None:
    """The Megatron backend's PEFT export (``actor/model/huggingface/adapter/``; ``actor/huggingface/adapter/`` in some versions)."""
    for folder in (actor_dir / "model" / "huggingface" / "adapter", actor_dir / "huggingface" / "adapter"):
        if _peft_export(folder):
            return folder
    return None


def _any_step_config(actor_dir: Path) -> Path | None:
    """An ``adapter_config.json`` written by verl at any step (also next to an empty or missing adapter)."""
    root = actor_dir.parent.parent
    for _step, folder in reversed(step_dirs(root)):
        for candidate in (folder / "actor" / LEGACY_ADAPTER_DIR, folder / "actor" / "model" / "huggingface" / "adapter"):
            if (candidate / ADAPTER_CONFIG_NAME).is_file():
                return candidate / ADAPTER_CONFIG_NAME
    return None


class VerlFormat:
    """verl ``trainer.default_local_dir`` folders with FSDP actor checkpoints per step."""

    name: ClassVar[str] = "verl"
    description: ClassVar[str] = "global_step_N/actor/ folders with model_world_size_W_rank_R.pt (verl FSDP)"

    def probe(self, root: Path) -> bool:
        return any(
            _legacy_adapter(d / "actor")
            or _megatron_adapter(d / "actor")
            or (d / "actor" / "model" / "dist_ckpt").is_dir()
            or any(map(is_verl_model_shard, (d / "actor").iterdir()))
            for _s, d in step_dirs(root)
        )

    def list_steps(self, root: Path) -> list[StepRef]:
        usable = [
            (s, d)
            for s, d in step_dirs(root)
            if model_shards(d / "actor") or _legacy_adapter(d / "actor") or _megatron_adapter(d / "actor")
        ]
        if not usable:
            megatron = [d for _s, d in step_dirs(root) if (d / "actor" / "model" / "dist_ckpt").is_dir()]
            if megatron:
                raise FormatDetectionError(
                    f"{megatron[-1] / 'actor' / 'model'}: verl Megatron checkpoint without the PEFT export huggingface/adapter/ "
                    "(only dist_ckpt/, which nextoffline does not read); save with the LoRA adapter export or pass --adapter STEP=PATH"
                )
            raise FormatDetectionError(f"{root}: no global_step_N/actor/ checkpoints found; point at verl's trainer.default_local_dir")
        steps = usable
        # one source for every step: the legacy lora_adapter/ (all present and non-empty), else the FSDP shards
        # (verl swallows lora_adapter/ save errors, and PEFT >= 0.21 can save it empty), else the Megatron export
        legacy = all(_legacy_adapter(d / "actor") for _s, d in steps)
        megatron = not legacy and all(_megatron_adapter(d / "actor") for _s, d in steps)
        refs = []
        for step, folder in steps:
            actor = folder / "actor"
            if legacy or megatron:
                adapter = _legacy_adapter(actor) if legacy else _megatron_adapter(actor)
                assert adapter is not None
                refs.append(StepRef(step=step, adapter_dir=adapter, weights_file=adapter / ADAPTER_WEIGHTS_NAME, checkpoint_dir=folder))
                continue
            shards = model_shards(actor)
            if not shards:
                raise AdapterFileError(f"{actor}: no model_world_size_W_rank_R.pt shards and no lora_adapter/; this step is incomplete")
            refs.append(StepRef(step=step, adapter_dir=actor, weights_file=shards[0], checkpoint_dir=folder))
        return refs

    def adapter_config(self, ref: StepRef) -> dict[str, Any]:
        """The step's PEFT config: ``lora_adapter/adapter_config.json``, or built for verl 0.9 shards."""
        path = ref.adapter_dir / ADAPTER_CONFIG_NAME
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        keys = _shard_entries(ref.weights_file, 0)
        if not (ref.adapter_dir / LORA_META_NAME).is_file():
            written = _any_step_config(ref.adapter_dir)  # lora_adapter/ missing or empty here: its config from any step
            if written is not None:
                config = json.loads(written.read_text(encoding="utf-8"))
                _check_config_fits(written, config, keys)
                return config
        return adapter_config_from_shards(ref.adapter_dir, keys)

    def resume_files(self, latest: StepRef) -> list[ResumeFiles]:
        """Every rank's model shard (and ``lora_adapter/``); optimizer, extra state, data and critic hold no actor LoRA."""
        actor = latest.checkpoint_dir / "actor"
        rewritten = frozenset({*model_shards(actor), actor / LEGACY_ADAPTER_DIR / ADAPTER_WEIGHTS_NAME})
        layout = "verl Megatron" if (actor / "model" / "dist_ckpt").is_dir() or _megatron_adapter(actor) else "verl FSDP"
        return [
            ResumeFiles(
                latest.checkpoint_dir, layout, rewritten, VERL_WEIGHTLESS, "verl FSDP/FSDP2/HSDP model_world_size_W_rank_R.pt shards"
            )
        ]

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        source = latest.checkpoint_dir
        actor = source / "actor"
        shards = model_shards(actor)
        if not shards:
            raise AdapterFileError(
                f"{actor}: no model_world_size_W_rank_R.pt shards; verl resumes only from them (save_contents must include 'model')"
            )
        entries = [_shard_entries(shard, rank) for rank, shard in enumerate(shards)]
        for shard, shard_entries in zip(shards[1:], entries[1:]):
            if shard_entries.keys() != entries[0].keys():
                raise AdapterFileError(f"{shard}: holds other LoRA keys than {shards[0].name}; the shards come from different runs")
        new = checked_new_weights(adapter_dir, {k: e.global_shape for k, e in entries[0].items()}, shards[0])
        target = out_dir / source.name
        rewritten = {actor: {p.name for p in shards}, actor / LEGACY_ADAPTER_DIR: {ADAPTER_WEIGHTS_NAME}}
        shutil.copytree(source, target, ignore=lambda d, names: [n for n in names if n in rewritten.get(Path(d), ())])
        for shard, shard_entries in zip(shards, entries):
            _write_shard(shard, target / "actor" / shard.name, shard_entries, new)
        legacy = actor / LEGACY_ADAPTER_DIR / ADAPTER_WEIGHTS_NAME
        if legacy.is_file() and _has_lora_tensors(legacy):
            rewrite_safetensors(legacy, target / "actor" / LEGACY_ADAPTER_DIR / ADAPTER_WEIGHTS_NAME, new)
        elif legacy.is_file():  # verl saved it empty (PEFT >= 0.21): fill it with the extrapolated adapter
            shutil.copyfile(adapter_dir / ADAPTER_WEIGHTS_NAME, target / "actor" / LEGACY_ADAPTER_DIR / ADAPTER_WEIGHTS_NAME)
        (out_dir / TRACKER_NAME).write_text(str(latest.step), encoding="utf-8")
        LOG.info("wrote verl checkpoint %s (%d shards)", target, len(shards))
        return ResumeInfo(checkpoint_dir=target, command=_resume_command(target), notes=_notes(latest.step, len(shards)))


def _write_shard(source: Path, dest: Path, entries: dict[str, ShardEntry], new: dict[str, torch.Tensor]) -> None:
    """Copy one rank's shard, replacing each LoRA block in place (a plain copy when nothing changes)."""
    names = list(entries)
    current = read_tensors(source, [entries[n].ref for n in names])
    updates = [(entries[n].ref, _block(entries[n], new[n]).to(old.dtype)) for n, old in zip(names, current)]
    if all(torch.equal(value, old) for (_ref, value), old in zip(updates, current)):
        shutil.copyfile(source, dest)
    else:
        patch_tensors(source, dest, updates)
    LOG.debug("wrote %s", dest)


def _resume_command(target: Path) -> str:
    return f"python -m verl.trainer.main_ppo <your training overrides> trainer.resume_mode=resume_path trainer.resume_from_path={target}"


def _notes(step: int, world_size: int) -> tuple[str, ...]:
    return (
        f"the resumed run continues at step {step}: optimizer, lr scheduler, RNG and dataloader state are those of the last real "
        "checkpoint; only the LoRA tensors were replaced, in every model_world_size_*_rank_*.pt shard (and lora_adapter/)",
        f"resume with the same world size ({world_size} GPUs) and FSDP strategy: verl loads model_world_size_{world_size}_rank_R.pt",
        "alternatively: trainer.default_local_dir=<the folder holding this global_step_N and latest_checkpointed_iteration.txt> "
        "trainer.resume_mode=auto (later checkpoints are then saved there)",
        "huggingface/ keeps the config and tokenizer; full HF weights there (save_contents 'hf_model') are not read on resume "
        "and were not updated",
    )


register_format(VerlFormat())
