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

from nextoffline.artifacts import ADAPTER_WEIGHTS_NAMES
from nextoffline.errors import FormatDetectionError
from nextoffline.formats.resume_files import ResumeFiles, check_resume_files
from nextoffline.types import ResumeInfo, StepRef

__all__ = [
    "FORMATS",
    "STEP_DIR",
    "STEP_DIR_PREFIX",
    "CheckpointFormat",
    "find_adapter_weights",
    "get_format",
    "parse_step_dir",
    "register_format",
    "write_resumable_checked",
]

#: Prefixes of folder (and Hub branch) names that carry a training step, as trainers write
#: them: ``checkpoint-N``, ``global_step_N``, ``global_stepN``, ``step_N``, ``step-N``, ``iter_N``.
STEP_DIR_PREFIX = r"(?:checkpoint-|global_step_?|step[_-]|iter_)"
#: A whole step folder name; group 1 is the step.
STEP_DIR = re.compile(STEP_DIR_PREFIX + r"(\d+)")


def parse_step_dir(name: str) -> int | None:
    """Return the step encoded in a folder name such as ``checkpoint-40``, or ``None``."""
    match = STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


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

    def resume_files(self, latest: StepRef) -> list[ResumeFiles]:
        """Every weight-bearing file the trainer loads on resume from ``latest``, as this writer handles it.

        :func:`write_resumable_checked` refuses before writing when the checkpoint holds a
        weight file that is neither rewritten nor declared weightless here.
        """

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


def write_resumable_checked(fmt: CheckpointFormat, latest: StepRef, adapter_dir: Path, out_dir: Path) -> ResumeInfo:
    """:meth:`CheckpointFormat.write_resumable` after :func:`check_resume_files` accepted the checkpoint.

    Raises:
        UnhandledCheckpointError: the checkpoint holds a weight file the writer would leave unchanged.
    """
    check_resume_files(fmt.resume_files(latest))
    return fmt.write_resumable(latest, adapter_dir, out_dir)


def describe_formats(formats: Iterable[CheckpointFormat]) -> str:
    """One short line listing what each format looks for."""
    return "; ".join(f"{f.name}: {f.description}" for f in formats)
