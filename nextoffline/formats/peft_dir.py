"""Plain PEFT adapter folders named by step (``step_10/``, ``checkpoint-10/``, ``iter_10/`` ...)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from nextoffline.errors import AdapterConfigError, IncompatibleCheckpointsError
from nextoffline.formats.base import find_adapter_weights, parse_step_dir, register_format
from nextoffline.formats.resume_files import ResumeFiles
from nextoffline.io.writer import copy_file
from nextoffline.types import ResumeInfo, StepRef

__all__ = ["PeftDirFormat", "step_named_adapters"]


def step_named_adapters(root: Path) -> list[StepRef]:
    """Every direct subfolder of ``root`` whose name carries a step and that holds a PEFT adapter."""
    refs: dict[int, StepRef] = {}
    for child in sorted(root.iterdir()):
        step = parse_step_dir(child.name) if child.is_dir() else None
        if step is None:
            continue
        weights = find_adapter_weights(child)
        if not (child / ADAPTER_CONFIG_NAME).exists():
            if weights is not None:  # an adapter without its config: broken, never skipped silently
                raise AdapterConfigError(
                    f"{child / ADAPTER_CONFIG_NAME}: missing next to {weights.name}; restore the "
                    "adapter_config.json that PEFT wrote (or move this folder out of the run)"
                )
            continue
        weights = weights or child / ADAPTER_WEIGHTS_NAME
        if step in refs:
            raise IncompatibleCheckpointsError(
                f"{root}: step {step} appears twice ({refs[step].adapter_dir.name}, {child.name}); keep one folder per step"
            )
        refs[step] = StepRef(step=step, adapter_dir=child, weights_file=weights, checkpoint_dir=child)
    return [refs[s] for s in sorted(refs)]


class PeftDirFormat:
    """A folder of step-named PEFT adapter folders, as ``save_pretrained`` writes them."""

    name: ClassVar[str] = "peft"
    description: ClassVar[str] = "subfolders named checkpoint-N/global_step_N/step_N/iter_N holding adapter_config.json"

    def probe(self, root: Path) -> bool:
        return root.is_dir() and bool(step_named_adapters(root))

    def list_steps(self, root: Path) -> list[StepRef]:
        return step_named_adapters(root)

    def resume_files(self, latest: StepRef) -> list[ResumeFiles]:
        """Only the adapter: the resume call (``PeftModel.from_pretrained``) loads nothing else, and nothing else is copied."""
        return [ResumeFiles(latest.adapter_dir, "plain PEFT folder", frozenset({latest.weights_file}), ("*",))]

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        target = out_dir / latest.adapter_dir.name
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            copy_file(adapter_dir / name, target / name)
        command = f"PeftModel.from_pretrained(base_model, {str(target)!r}, is_trainable=True)"
        return ResumeInfo(checkpoint_dir=target, command=command, notes=("plain PEFT folder: no optimizer state to resume",))


register_format(PeftDirFormat())
