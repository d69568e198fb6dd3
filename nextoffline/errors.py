"""Error hierarchy of nextoffline.

Every error raised for bad user input derives from :class:`NextOfflineError`. The CLI turns
them into a one-line message and a non-zero exit code; anything else is a bug and keeps its
traceback. Messages say what was found, where (file or key), and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AdapterConfigError",
    "AdapterFileError",
    "EvaluationError",
    "FormatDetectionError",
    "HubError",
    "IncompatibleCheckpointsError",
    "NextOfflineError",
    "NotEnoughCheckpointsError",
    "NumericalError",
    "OutputError",
    "SourceNotFoundError",
    "UnhandledCheckpointError",
    "UnsupportedAdapterError",
    "UsageError",
    "WaitTimeoutError",
]


class NextOfflineError(Exception):
    """Base class of every error caused by user input or environment, never by a bug."""

    exit_code: int = 1


class SourceNotFoundError(NextOfflineError, FileNotFoundError):
    """The source path (or a file it must contain) does not exist."""


class FormatDetectionError(NextOfflineError, ValueError):
    """No trainer layout, or more than one, matches the source folder."""


class AdapterConfigError(NextOfflineError, ValueError):
    """``adapter_config.json`` is missing, unreadable or inconsistent."""


class AdapterFileError(NextOfflineError, ValueError):
    """An adapter weight file is missing, truncated, corrupted or holds unexpected tensors."""


class UnsupportedAdapterError(NextOfflineError, ValueError):
    """The adapter is not a plain LoRA adapter (DoRA, LoHa, LoKr, VeRA, IA3, prompt tuning, ...)."""


class IncompatibleCheckpointsError(NextOfflineError, ValueError):
    """Checkpoints of one trajectory disagree (keys, shapes, ranks, scalings, dtypes)."""


class UnhandledCheckpointError(NextOfflineError, ValueError):
    """``--resumable`` met a weight-bearing file its trainer loads on resume that it does not rewrite."""


class NotEnoughCheckpointsError(NextOfflineError, ValueError):
    """The trajectory has fewer steps than the requested operation needs."""


class NumericalError(NextOfflineError, ArithmeticError):
    """A tensor holds NaN/Inf, or a computation produced a non-finite result."""


class OutputError(NextOfflineError, OSError):
    """The output location is unusable (exists, inside the source, unwritable, no space)."""


class UsageError(NextOfflineError, ValueError):
    """Options that contradict each other or are out of range."""


class HubError(NextOfflineError, OSError):
    """A Hugging Face Hub operation failed (unknown repo/revision, auth, offline, unreachable)."""


class EvaluationError(NextOfflineError, RuntimeError):
    """A user evaluation command failed, timed out or printed no score."""


class WaitTimeoutError(NextOfflineError, TimeoutError):
    """``watch``: the awaited checkpoint did not become complete in time (exit code 124, as timeout(1))."""

    exit_code = 124
