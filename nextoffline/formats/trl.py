"""TRL / Hugging Face ``Trainer`` run folders: ``checkpoint-N/`` with a PEFT adapter and trainer state.

What is read and written is documented in ``docs/formats.md``. On resume,
``Trainer._load_from_checkpoint`` loads the adapter from ``adapter_model.safetensors`` of the
checkpoint folder; with DeepSpeed from the ``global_stepN/`` tag folder (ZeRO-1/2/3), with
accelerate FSDP from ``pytorch_model_fsdp.bin`` or the DCP folder ``pytorch_model_fsdp_0/``; all of
them are rewritten. ``optimizer*``, ``scheduler.pt``, ``rng_state*.pth`` and ``trainer_state.json``
are copied unchanged, so the resumed run continues at the last real step with the extrapolated
weights. FSDP ``SHARDED_STATE_DICT`` runs save no adapter file: the LoRA is then read from the DCP
folder, with the ``adapter_config.json`` found in the run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAMES
from nextoffline.errors import AdapterConfigError, FormatDetectionError
from nextoffline.formats.accelerate_fsdp import FSDP_SHARDED, fsdp_model_files, load_sharded_lora_state, rewrite_full, rewrite_sharded
from nextoffline.formats.base import find_adapter_weights, parse_step_dir, register_format
from nextoffline.formats.deepspeed_zero3 import is_zero3_tag
from nextoffline.formats.openrlhf import MODEL_STATES, deepspeed_rewritten_files, write_deepspeed_checkpoint
from nextoffline.formats.peft_dir import step_named_adapters
from nextoffline.formats.resume_files import ResumeFiles, describe_weight_file, most_telling, weight_bearing_files
from nextoffline.io.reader import register_state_loader
from nextoffline.io.writer import copy_file
from nextoffline.types import ResumeInfo, StepRef

__all__ = ["TrlFormat"]

TRAINER_STATE_NAME = "trainer_state.json"
#: Files ``Trainer._save_checkpoint`` writes that hold no model weights (restored by
#: ``_load_optimizer_and_scheduler``/``_load_rng_state``, or not read at all).
TRAINER_WEIGHTLESS = (
    "optimizer.pt",
    "optimizer.bin",  # accelerate FSDP FULL_STATE_DICT optimizer (save_fsdp_optimizer)
    "optimizer_*",  # accelerate FSDP sharded optimizer (DCP folder optimizer_0/ or optimizer_0_rankR.bin)
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "rng_state_*.pth",
    "training_args.bin",
)


class TrlFormat:
    """``checkpoint-N/`` folders written by ``transformers.Trainer`` (TRL GRPO/PPO/DPO/SFT trainers)."""

    name: ClassVar[str] = "trl"
    description: ClassVar[str] = "checkpoint-N/ folders with adapter_config.json and trainer_state.json"

    def probe(self, root: Path) -> bool:
        return bool(_trainer_checkpoints(root))

    def list_steps(self, root: Path) -> list[StepRef]:
        refs = [ref for ref in step_named_adapters(root) if ref.checkpoint_dir.name.startswith("checkpoint-")]
        if not refs:
            refs = _sharded_fsdp_steps(root)
        if not refs:
            _refuse_without_adapter(root)
        return refs

    def adapter_config(self, ref: StepRef) -> dict[str, Any]:
        """``adapter_config.json`` of the step, else (FSDP ``SHARDED_STATE_DICT`` runs) the one found in the run folder."""
        for folder in (ref.adapter_dir, ref.adapter_dir.parent, *sorted(ref.adapter_dir.parent.glob("checkpoint-*"))):
            path = folder / ADAPTER_CONFIG_NAME
            if path.is_file():
                return _read_json(path)
        raise AdapterConfigError(
            f"{ref.adapter_dir / ADAPTER_CONFIG_NAME}: missing (accelerate FSDP SHARDED_STATE_DICT checkpoints hold no adapter "
            "config, so lora_alpha is unknown); write it with peft_config.save_pretrained(RUN_FOLDER) using the LoraConfig of the run"
        )

    def resume_files(self, latest: StepRef) -> list[ResumeFiles]:
        """The adapter file, and with DeepSpeed every ZeRO-1/2 tag folder's module and optimizer states."""
        tags = _deepspeed_tags(latest.checkpoint_dir)
        rewritten = {latest.checkpoint_dir / name for name in ADAPTER_WEIGHTS_NAMES}
        for tag in tags:
            rewritten |= deepspeed_rewritten_files(tag)
        fsdp = fsdp_model_files(latest.checkpoint_dir)
        rewritten |= set(fsdp)
        stages = sorted({"ZeRO-3" if is_zero3_tag(tag) else "ZeRO-1/2" for tag in tags})
        layout = f"TRL + DeepSpeed {'/'.join(stages)}" if tags else "TRL + accelerate FSDP" if fsdp else "TRL / transformers.Trainer"
        return [
            ResumeFiles(
                latest.checkpoint_dir,
                layout,
                frozenset(rewritten),
                TRAINER_WEIGHTLESS,
                "the PEFT adapter file, DeepSpeed ZeRO-1/2/3 global_stepN/ folders (tensor parallel 1) and accelerate FSDP "
                "pytorch_model_fsdp.bin / pytorch_model_fsdp_0/",
            )
        ]

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        target = out_dir / latest.checkpoint_dir.name
        deepspeed_tags = _deepspeed_tags(latest.checkpoint_dir)
        fsdp = fsdp_model_files(latest.checkpoint_dir)
        skip = {*ADAPTER_WEIGHTS_NAMES, *(tag.name for tag in deepspeed_tags), *(f.name for f in fsdp)}
        shutil.copytree(
            latest.checkpoint_dir, target, ignore=lambda d, names: [n for n in names if n in skip and Path(d) == latest.checkpoint_dir]
        )
        if find_adapter_weights(latest.checkpoint_dir) is not None or not fsdp:
            copy_file(adapter_dir / ADAPTER_WEIGHTS_NAME, target / ADAPTER_WEIGHTS_NAME)
        for tag in deepspeed_tags:  # with DeepSpeed, Trainer resumes the weights from global_stepN/, not the adapter file
            write_deepspeed_checkpoint(tag, target / tag.name, adapter_dir)
        for path in fsdp:  # with FSDP, from load_fsdp_model (pytorch_model_fsdp.bin or the DCP folder)
            (rewrite_full if path.is_file() else rewrite_sharded)(path, target / path.name, adapter_dir)
        command = f"trainer.train(resume_from_checkpoint={str(target)!r})"
        notes = (
            f"the resumed run continues at step {latest.step} (trainer_state.json, optimizer, scheduler and RNG state "
            "are those of the last real checkpoint); only the LoRA weights are extrapolated",
        ) + (
            (
                "DeepSpeed state found: LoRA values were also replaced in global_step*/ (ZeRO-1/2: bf16 module states and fp32 masters; ZeRO-3: every rank's fp32 partitions)",
            )
            if deepspeed_tags
            else ()
        )
        if fsdp:
            notes += (f"accelerate FSDP model files found: their LoRA tensors were replaced ({', '.join(f.name for f in fsdp)})",)
        return ResumeInfo(checkpoint_dir=target, command=command, notes=notes)


def _trainer_checkpoints(root: Path) -> list[Path]:
    """``checkpoint-N/`` folders holding ``trainer_state.json`` (with or without an adapter file)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("checkpoint-*") if parse_step_dir(p.name) is not None and (p / TRAINER_STATE_NAME).is_file())


def _refuse_without_adapter(root: Path) -> None:
    """Name the layout of a Trainer run that saved no PEFT adapter (FSDP2 sharded, full fine-tune)."""
    checkpoints = _trainer_checkpoints(root)
    latest = max(checkpoints, key=lambda p: parse_step_dir(p.name) or 0) if checkpoints else root
    weights = [p for p in weight_bearing_files(latest) if p.name not in TRAINER_WEIGHTLESS and not p.name.startswith("rng_state")]
    found = f"{most_telling(weights).name} ({describe_weight_file(most_telling(weights))})" if weights else "no weight file"
    raise FormatDetectionError(
        f"{latest}: transformers.Trainer checkpoint without adapter_config.json/adapter_model.safetensors (found {found}); "
        "nextoffline reads LoRA adapters only: save with a PEFT model (FSDP: fsdp_state_dict_type FULL_STATE_DICT, "
        "or PeftModel.save_pretrained per checkpoint) or pass --adapter STEP=PATH"
    )


def _sharded_fsdp_steps(root: Path) -> list[StepRef]:
    """Steps of an accelerate FSDP SHARDED_STATE_DICT run (no adapter file): the LoRA lives in ``pytorch_model_fsdp_0/``."""
    refs = []
    for checkpoint in _trainer_checkpoints(root):
        folder = checkpoint / "pytorch_model_fsdp_0"
        step = parse_step_dir(checkpoint.name)
        if step is not None and (folder / ".metadata").is_file():
            refs.append(StepRef(step=step, adapter_dir=checkpoint, weights_file=folder / ".metadata", checkpoint_dir=checkpoint))
    return sorted(refs, key=lambda r: r.step)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConfigError(f"{path}: invalid JSON ({type(exc).__name__}); restore the file PEFT wrote") from None
    if not isinstance(value, dict):
        raise AdapterConfigError(f"{path}: expected a JSON object; restore the file PEFT wrote")
    return value


def _is_fsdp_metadata(path: Path) -> bool:
    return path.name == ".metadata" and FSDP_SHARDED.match(path.parent.name) is not None


register_state_loader(_is_fsdp_metadata, lambda path: load_sharded_lora_state(path.parent))


def _deepspeed_tags(checkpoint_dir: Path) -> list[Path]:
    """``global_stepN/`` DeepSpeed tag folders that transformers.Trainer writes beside the adapter."""
    return sorted(p for p in checkpoint_dir.glob("global_step*") if (p / MODEL_STATES).is_file() or is_zero3_tag(p))


register_format(TrlFormat())
