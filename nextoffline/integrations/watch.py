"""Wait until a training run's checkpoint of a given step is complete (``nextoffline watch``).

A checkpoint counts as complete when

1. the trainer's own marker says so: verl's ``latest_checkpointed_iteration.txt`` names the step
   or a later one; DeepSpeed's ``_actor/latest`` (OpenRLHF) names ``global_stepN`` with ``N`` at or
   past the step; TRL / ``transformers.Trainer`` wrote ``checkpoint-N/trainer_state.json`` (its last
   file); plain PEFT folders have no marker;
2. every file of the step's folders keeps its size and modification time over two polls, and
3. the trajectory up to that step loads (every header is valid).

Nothing is written while waiting. See ``docs/formats.md`` for the marker files.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nextoffline.errors import NextOfflineError, UsageError, WaitTimeoutError
from nextoffline.types import StepRef

__all__ = ["Readiness", "check_step", "wait_for_step"]

LOG = logging.getLogger(__name__)

VERL_TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_LATEST = ("_actor", "latest")
TRL_LAST_FILE = "trainer_state.json"
_TAG_STEP = re.compile(r"global_step_?(\d+)$")

Snapshot = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Readiness:
    """One look at the run: ``snapshot`` is set when the markers say the step is saved."""

    format_name: str | None
    snapshot: Snapshot | None
    reason: str


def _read_marker(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _marker_step(format_name: str, root: Path) -> tuple[bool, int | None, str]:
    """``(has_marker, step_it_names, file)`` for layouts whose trainer writes one."""
    if format_name == "verl":
        path = root / VERL_TRACKER
    elif format_name == "openrlhf" and (root / DEEPSPEED_LATEST[0]).is_dir():
        path = root.joinpath(*DEEPSPEED_LATEST)
    else:
        return False, None, ""
    text = _read_marker(path)
    if text is None:
        return True, None, path.name
    match = re.fullmatch(r"\d+", text) or _TAG_STEP.search(text)
    return True, (int(match[1] if match.re is _TAG_STEP else match[0]) if match else None), path.name


def _snapshot(ref: StepRef) -> Snapshot:
    """Size and mtime of every file of the step's folders."""
    folders = {ref.checkpoint_dir, ref.adapter_dir}
    entries = []
    for folder in sorted(folders):
        for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
            try:
                info = path.stat()
            except FileNotFoundError:  # removed while listing: not stable
                entries.append((str(path), -1, -1))
                continue
            if path.is_file():
                entries.append((str(path), info.st_size, info.st_mtime_ns))
    return tuple(entries)


def _complete(format_name: str, ref: StepRef, marked: int | None) -> bool:
    """Whether a step's checkpoint is finished by its trainer's marker (False where there is none)."""
    if format_name == "trl":
        return (ref.checkpoint_dir / TRL_LAST_FILE).is_file()
    return marked is not None and marked >= ref.step


def check_step(root: Path, step: int, format_name: str | None = None) -> Readiness:
    """Look once: is ``step`` saved according to the trainer's markers? (no waiting, no writing)

    Raises:
        UsageError: a later step is complete but ``step`` was never saved (it will not appear).
    """
    from nextoffline.formats import detect_format, get_format

    if not root.is_dir():
        return Readiness(format_name, None, f"{root} does not exist yet")
    try:
        fmt = get_format(format_name) if format_name else detect_format(root)
    except NextOfflineError as exc:
        return Readiness(format_name, None, f"no checkpoint layout recognised yet ({exc})")
    has_marker, marked, marker_file = _marker_step(fmt.name, root)
    try:
        refs = {ref.step: ref for ref in fmt.list_steps(root)}
    except NextOfflineError as exc:
        return Readiness(fmt.name, None, f"a checkpoint is being written ({exc})")
    ref = refs.get(step)
    if ref is None:
        if any(s > step and _complete(fmt.name, refs[s], marked if has_marker else None) for s in refs):
            raise UsageError(
                f"{root}: step {step} was not saved (saved steps: {', '.join(map(str, sorted(refs)))}); "
                "pick a step the trainer saves (its save frequency)"
            )
        return Readiness(fmt.name, None, f"latest saved step is {max(refs) if refs else 'none'}")
    if has_marker and (marked is None or marked < step):
        return Readiness(fmt.name, None, f"{marker_file} names step {marked if marked is not None else 'none'}")
    if fmt.name == "trl" and not (ref.checkpoint_dir / TRL_LAST_FILE).is_file():
        return Readiness(fmt.name, None, f"{ref.checkpoint_dir.name}/{TRL_LAST_FILE} not written yet")
    return Readiness(fmt.name, _snapshot(ref), f"step {step} saved; checking that its files stopped changing")


def wait_for_step(
    root: Path,
    step: int,
    *,
    format_name: str | None = None,
    timeout: float,
    poll: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll until checkpoint ``step`` of the run in ``root`` is complete; return the layout's name.

    Raises:
        WaitTimeoutError: not complete within ``timeout`` seconds (the message says what was seen last).
        UsageError: the step will never be saved.
    """
    from nextoffline.trajectory import load_trajectory

    deadline = clock() + timeout
    previous: Snapshot | None = None
    reason = ""
    LOG.info("waiting for checkpoint %d in %s", step, root)
    while True:
        status = check_step(root, step, format_name)
        reason = status.reason
        if status.snapshot is not None and status.snapshot == previous:
            try:
                load_trajectory(root, format_name=status.format_name, max_step=step)
                return str(status.format_name)
            except NextOfflineError as exc:
                reason = f"step {step} does not load yet ({exc})"
        previous = status.snapshot
        if clock() >= deadline:
            raise WaitTimeoutError(
                f"{root}: checkpoint {step} not complete after {timeout:.3g}s (last seen: {reason}); "
                "check RUN_DIR and --at-step, or raise --timeout"
            )
        LOG.debug("step %d: %s", step, reason)
        sleep(poll)
