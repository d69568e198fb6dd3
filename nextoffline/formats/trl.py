"""TRL / Hugging Face ``Trainer`` run folders: ``checkpoint-N/`` with a PEFT adapter and trainer state.

What is read and written is documented in ``docs/formats.md``. On resume,
``Trainer._load_from_checkpoint`` loads the adapter from ``adapter_model.safetensors`` of the
checkpoint folder; ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth`` and
``trainer_state.json`` are copied unchanged, so the resumed run continues at the last real
step with the extrapolated weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from nextoffline.formats.base import ADAPTER_WEIGHTS_NAMES, register_format
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
        return any(ref.checkpoint_dir.name.startswith("checkpoint-") and (ref.checkpoint_dir / TRAINER_STATE_NAME).is_file()
                   for ref in step_named_adapters(root))

    def list_steps(self, root: Path) -> list[StepRef]:
        return [ref for ref in step_named_adapters(root) if ref.checkpoint_dir.name.startswith("checkpoint-")]

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        target = out_dir / latest.checkpoint_dir.name
        shutil.copytree(latest.checkpoint_dir, target, ignore=shutil.ignore_patterns(*ADAPTER_WEIGHTS_NAMES))
        copy_file(adapter_dir / "adapter_model.safetensors", target / "adapter_model.safetensors")
        command = f"trainer.train(resume_from_checkpoint={str(target)!r})"
        notes = (
            f"the resumed run continues at step {latest.step} (trainer_state.json, optimizer, scheduler and RNG state "
            "are those of the last real checkpoint); only the LoRA weights are extrapolated",
        )
        return ResumeInfo(checkpoint_dir=target, command=command, notes=notes)


register_format(TrlFormat())
