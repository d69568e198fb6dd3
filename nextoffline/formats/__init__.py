"""Trainer checkpoint layouts, one module per trainer, chosen by probing the source folder."""

from __future__ import annotations

from pathlib import Path

from nextoffline.errors import FormatDetectionError
from nextoffline.formats import openrlhf, peft_dir, trl, verl  # noqa: F401  (each registers itself)
from nextoffline.formats.base import FORMATS, CheckpointFormat, describe_formats, get_format, parse_step_dir

__all__ = ["FORMATS", "CheckpointFormat", "detect_format", "get_format", "parse_step_dir"]

GENERIC_FORMAT = "peft"


def detect_format(root: Path) -> CheckpointFormat:
    """The one registered format whose probe accepts ``root``.

    A trainer-specific layout wins over the generic step-named PEFT folder layout.

    Raises:
        FormatDetectionError: no layout matches, or several trainer layouts do.
    """
    matches = [fmt for fmt in FORMATS.values() if fmt.probe(root)]
    specific = [fmt for fmt in matches if fmt.name != GENERIC_FORMAT]
    if len(specific) > 1:
        names = ", ".join(f.name for f in specific)
        raise FormatDetectionError(f"{root}: layout is ambiguous ({names} all match); pass --format NAME")
    if specific:
        return specific[0]
    if matches:
        return matches[0]
    raise FormatDetectionError(
        f"{root}: no checkpoints found (looked for {describe_formats(FORMATS.values())}); "
        "point at the run folder or pass --adapter STEP=PATH"
    )
