"""TRL / Hugging Face ``Trainer`` run folders: ``checkpoint-N/`` with a PEFT adapter and trainer state.

What is read and written is documented in ``docs/formats.md``. On resume,
``Trainer._load_from_checkpoint`` loads the adapter from ``adapter_model.safetensors`` of the
checkpoint folder (with DeepSpeed, from the ``global_stepN/`` tag folder, which is rewritten too); ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth`` and
``trainer_state.json`` are copied unchanged, so the resumed run continues at the last real
step with the extrapolated weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from nextoffline.artifacts import ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAMES
from nextoffline.formats.base import register_format
from nextoffline.formats.openrlhf import MODEL_STATES, write_deepspeed_checkpoint
from nextoffline.formats.peft_dir import step_named_adapters
from nextoffline.io.writer import copy_file
from nextoffline.types import ResumeInfo, StepRef

__all__ = ["TrlFormat"]

TRAINER_STATE_NAME = "trainer_state.json"


class TrlFormat:
    """``checkpoint-N/`` folders written by ``transformers.Trainer`` (TRL GRPO/PPO/DPO/SFT trainers)."""

    name: ClassVar[str] = "trl"
    description: ClassVar[str] = "checkpoint-N/ folders with adapter_config.json and trainer_state.json"

    def probe(self, root: Path) -> bool:
        if not root.is_dir():
            return False
        return any(
            ref.checkpoint_dir.name.startswith("checkpoint-") and (ref.checkpoint_dir / TRAINER_STATE_NAME).is_file()
            for ref in step_named_adapters(root)
        )

    def list_steps(self, root: Path) -> list[StepRef]:
        return [ref for ref in step_named_adapters(root) if ref.checkpoint_dir.name.startswith("checkpoint-")]

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        target = out_dir / latest.checkpoint_dir.name
        deepspeed_tags = _deepspeed_tags(latest.checkpoint_dir)
        skip = {*ADAPTER_WEIGHTS_NAMES, *(tag.name for tag in deepspeed_tags)}
        shutil.copytree(
            latest.checkpoint_dir, target, ignore=lambda d, names: [n for n in names if n in skip and Path(d) == latest.checkpoint_dir]
        )
        copy_file(adapter_dir / ADAPTER_WEIGHTS_NAME, target / ADAPTER_WEIGHTS_NAME)
        for tag in deepspeed_tags:  # with DeepSpeed, Trainer resumes the weights from global_stepN/, not the adapter file
            write_deepspeed_checkpoint(tag, target / tag.name, adapter_dir)
        command = f"trainer.train(resume_from_checkpoint={str(target)!r})"
        notes = (
            f"the resumed run continues at step {latest.step} (trainer_state.json, optimizer, scheduler and RNG state "
            "are those of the last real checkpoint); only the LoRA weights are extrapolated",
        ) + (
            ("DeepSpeed state found: LoRA values were also replaced in global_step*/ model states and fp32 masters",)
            if deepspeed_tags
            else ()
        )
        return ResumeInfo(checkpoint_dir=target, command=command, notes=notes)


def _deepspeed_tags(checkpoint_dir: Path) -> list[Path]:
    """``global_stepN/`` DeepSpeed tag folders that transformers.Trainer writes beside the adapter."""
    return sorted(p for p in checkpoint_dir.glob("global_step*") if (p / MODEL_STATES).is_file())


register_format(TrlFormat())
