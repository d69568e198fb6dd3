"""The protocol every trainer layout implements, and the registry that holds them.

A format knows three things about one trainer's run folder: how to recognise it
(:meth:`CheckpointFormat.probe`), where each saved step keeps its LoRA adapter
(:meth:`CheckpointFormat.list_steps`), and how to lay out a checkpoint that the trainer
resumes from (:meth:`CheckpointFormat.write_resumable`). Reading and validating the tensors
is shared (``nextoffline.io``), so formats stay small.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from nextoffline.errors import FormatDetectionError
from nextoffline.types import ResumeInfo, StepRef

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAMES",
    "FORMATS",
    "STEP_DIR_PATTERNS",
    "CheckpointFormat",
    "find_adapter_weights",
    "get_format",
    "parse_step_dir",
    "register_format",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

#: Folder names that carry a training step, as trainers write them.
STEP_DIR_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"^checkpoint-(\d+)$",
        r"^global_step_(\d+)$",
        r"^global_step(\d+)$",
        r"^step_(\d+)$",
        r"^step-(\d+)$",
        r"^iter_(\d+)$",
    )
)


def parse_step_dir(name: str) -> int | None:
    """Return the step encoded in a folder name such as ``checkpoint-40``, or ``None``."""
    for pattern in STEP_DIR_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def find_adapter_weights(folder: Path) -> Path | None:
    """The adapter weight file inside ``folder`` (safetensors preferred), or ``None``."""
    for name in ADAPTER_WEIGHTS_NAMES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


@runtime_checkable
class CheckpointFormat(Protocol):
    """One trainer's on-disk layout of LoRA checkpoints."""

    name: ClassVar[str]
    description: ClassVar[str]

    def probe(self, root: Path) -> bool:
        """True when ``root`` looks like a run folder of this trainer (cheap, files only)."""

    def list_steps(self, root: Path) -> list[StepRef]:
        """Every saved step under ``root``, sorted by step. Raises on a broken layout."""

    def write_resumable(self, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
        """Build a native checkpoint in ``out_dir`` (an empty temporary folder).

        ``latest`` is the newest real checkpoint; its non-weight files are copied, and every
        place the trainer loads LoRA weights from on resume is filled from the finished
        PEFT adapter in ``adapter_dir``. The source is never written.
        """


FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Add a format instance to the registry under its ``name``."""
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> CheckpointFormat:
    """The registered format called ``name``; a clear error lists the known names."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise FormatDetectionError(f"unknown format {name!r}; use one of: {known}") from None


def describe_formats(formats: Iterable[CheckpointFormat]) -> str:
    """One short line listing what each format looks for."""
    return "; ".join(f"{f.name}: {f.description}" for f in formats)
