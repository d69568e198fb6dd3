"""Shared click options, logging set-up and the error boundary of the CLI."""

from __future__ import annotations

import functools
import logging
import math
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from nextoffline.errors import NextOfflineError, UsageError

__all__ = [
    "Common",
    "command_line",
    "common_options",
    "compute_options",
    "echo_json",
    "parse_float_list",
    "resolve_source",
    "source_options",
]

LOG = logging.getLogger("nextoffline")


@dataclass
class Common:
    """Options every command shares."""

    verbose: int
    quiet: bool

    @property
    def progress(self) -> bool:
        return not self.quiet


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``-v`` (repeatable; shows tracebacks), ``--quiet``; turns NextOfflineError into one line."""

    @click.option("-v", "--verbose", count=True, help="More logging; -v also shows tracebacks of errors.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
    @functools.wraps(func)
    def wrapper(*args: Any, verbose: int, quiet: bool, **kwargs: Any) -> Any:
        _setup_logging(verbose, quiet)
        previous = _terminate_as_interrupt()
        try:
            return func(*args, common=Common(verbose, quiet), **kwargs)
        except NextOfflineError as exc:
            if verbose:
                raise
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing partial was left behind", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _one_line(text: str) -> str:
    """Messages are one line: newlines (e.g. from a quoted file name) are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _terminate_as_interrupt() -> Any:
    """Let SIGTERM (``kill``, job schedulers) unwind like Ctrl-C, so temporary output is removed.

    Returns the previous handler to restore, or ``None`` when not installable (not the main thread).
    """

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def source_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """SOURCE argument (folder or hf://owner/repo[@rev][/sub]), --adapter, --format, --token."""
    func = click.argument("source", required=False)(func)
    func = click.option("--adapter", "adapters", multiple=True, metavar="STEP=PATH", help="Explicit adapter folder per step (repeat).")(
        func
    )
    func = click.option("--format", "format_name", default=None, help="Force a layout: peft, trl, verl, openrlhf (default: probe).")(func)
    func = click.option("--token", default=None, envvar="HF_TOKEN", help="Hugging Face token for hf:// sources (default: $HF_TOKEN).")(func)
    return func


#: ``nextoffline.loader.DEFAULT_CHUNK_BYTES`` in MiB (not imported: the CLI starts without torch).
DEFAULT_CHUNK_MB = 64


def compute_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--device and --chunk-mb."""
    func = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(func)
    func = click.option(
        "--chunk-mb",
        default=DEFAULT_CHUNK_MB,
        show_default=True,
        type=click.IntRange(1),
        help="Memory budget of one module batch (stored dtype; widened to float32 on the device).",
    )(func)
    return func


def resolve_source(source: str | None, adapters: tuple[str, ...], *, token: str | None, trainer_state: bool, progress: bool):
    """Local path (hf:// sources are materialised in the HF cache) plus a label and adapter map."""
    from nextoffline.trajectory import parse_adapter_pairs

    if adapters:
        if source:
            raise UsageError("give either SOURCE or --adapter STEP=PATH, not both")
        return None, parse_adapter_pairs(adapters), "explicit adapters"
    if not source:
        raise UsageError("missing SOURCE: a run folder, hf://owner/repo[@revision] or --adapter STEP=PATH")
    if source.startswith("hf://"):
        from nextoffline import hub

        path = hub.materialize_source(source, token=token, include_trainer_state=trainer_state, progress=progress)
        return path, None, source
    return Path(source), None, source


def parse_float_list(text: str | None, option: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]`` with a clear error on junk."""
    if not text:
        return []
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"{option} {text!r}: {part.strip()!r} is not a number; give numbers separated by commas") from None
        if not math.isfinite(value):
            raise UsageError(f"{option} {text!r}: values must be finite")
        values.append(value)
    return values


def command_line() -> str:
    """The invocation, for provenance."""
    return " ".join(shlex.quote(a) for a in ["nextoffline", *sys.argv[1:]])


def echo_json(payload: Any) -> None:
    """Strict JSON on stdout (NaN/Infinity, e.g. an undefined backtest error, become ``null``)."""
    import json

    from nextoffline.io.writer import json_safe

    click.echo(json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False))
