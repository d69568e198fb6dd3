"""Every click option of the CLI (declared once here), logging set-up and the error boundary.

Commands compose these decorators; :func:`load_source` and :func:`run_settings` turn the
shared options into a trajectory and the pipeline's settings.
"""

from __future__ import annotations

import contextlib
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
    "ComputeArgs",
    "FullArgs",
    "PredictorArgs",
    "SourceArgs",
    "command_line",
    "common_options",
    "compute_options",
    "device_option",
    "echo_json",
    "full_options",
    "holdout_option",
    "json_option",
    "load_source",
    "next_epochs_option",
    "out_option",
    "overwrite_option",
    "parse_float_list",
    "predictor_options",
    "resolve_source",
    "run_settings",
    "source_options",
    "token_option",
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
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "filelock"):
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
            if PROCESS.entry:
                _late_interrupts_end_quietly()

    return wrapper


class _Process:
    """Set by :func:`nextoffline.cli.run`: this interpreter exists to run one command."""

    entry = False


PROCESS = _Process()


def _late_interrupts_end_quietly() -> None:
    """Once the command is done (its output committed or removed), a Ctrl-C during interpreter
    shutdown ends the process by the signal instead of printing a KeyboardInterrupt traceback."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_DFL)


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


token_option = click.option("--token", default=None, envvar="HF_TOKEN", help="Hugging Face token (default: $HF_TOKEN).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
out_option = click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder (created atomically).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
holdout_option = click.option(
    "--holdout", default=2, show_default=True, type=click.IntRange(1), help="Checkpoints held out at the end by the backtest."
)
horizon_option = click.option("--horizon", type=click.IntRange(1), default=None, help="Horizon in checkpoints (default: min(5, (K-2)//2)).")


@dataclass(frozen=True)
class SourceArgs:
    """The source options: SOURCE, --adapter, --format, --token."""

    source: str | None
    adapters: tuple[str, ...]
    format_name: str | None
    token: str | None


@dataclass(frozen=True)
class ComputeArgs:
    """The compute options: --device, --chunk-mb."""

    device: str
    chunk_mb: int


@dataclass(frozen=True)
class PredictorArgs:
    """The predictor options: --horizon, --next-epochs."""

    horizon: int | None
    next_epochs: int


@dataclass(frozen=True)
class FullArgs:
    """The full-parameter options: --full, --base (see :mod:`nextoffline.dense`)."""

    full: bool
    base: str | None  # a model folder or hf://owner/repo[@revision][/subfolder]


def _packed(func: Callable[..., Any], into: str, cls: type, names: tuple[str, ...]) -> Callable[..., Any]:
    """``func`` called with the options ``names`` gathered into one ``cls`` keyword ``into``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs[into] = cls(*(kwargs.pop(name) for name in names))
        return func(*args, **kwargs)

    return wrapper


def next_epochs_option(default: int = 1000) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--next-epochs with a command's default (the reference 1000; the demo fewer)."""
    return click.option("--next-epochs", type=click.IntRange(1), default=default, show_default=True, help="NExt training epochs.")


def predictor_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--horizon and --next-epochs, passed as ``predictor_args: PredictorArgs``."""
    func = _packed(func, "predictor_args", PredictorArgs, ("horizon", "next_epochs"))
    return horizon_option(next_epochs_option()(func))


def source_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """SOURCE argument (folder or hf://owner/repo[@rev][/sub]), --adapter, --format, --token,
    passed as ``src: SourceArgs``."""
    func = _packed(func, "src", SourceArgs, ("source", "adapters", "format_name", "token"))
    func = click.argument("source", required=False)(func)
    func = click.option("--adapter", "adapters", multiple=True, metavar="STEP=PATH", help="Explicit adapter folder per step (repeat).")(
        func
    )
    func = click.option("--format", "format_name", default=None, help="Force a layout: peft, trl, verl, openrlhf (default: probe).")(func)
    return token_option(func)


def full_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--full and --base, passed as ``full_args: FullArgs``."""
    func = _packed(func, "full_args", FullArgs, ("full", "base"))
    func = click.option("--full", is_flag=True, help="Full-parameter trajectory (default: detected by probing).")(func)
    return click.option(
        "--base",
        default=None,
        help="Full-parameter: the step-0 model, a folder or hf://owner/repo[@rev][/sub] (default: earliest checkpoint).",
    )(func)


#: ``nextoffline.loader.DEFAULT_CHUNK_BYTES`` in MiB (not imported: the CLI starts without torch).
DEFAULT_CHUNK_MB = 64


def compute_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--device and --chunk-mb, passed as ``compute: ComputeArgs``."""
    func = _packed(func, "compute", ComputeArgs, ("device", "chunk_mb"))
    func = device_option(func)
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


def load_source(src: SourceArgs, common: Common, *, trainer_state: bool = False, max_step: int | None = None):
    """The trajectory named by the source options (checkpoints up to ``max_step`` when given)."""
    from nextoffline.trajectory import load_trajectory

    path, explicit, label = resolve_source(src.source, src.adapters, token=src.token, trainer_state=trainer_state, progress=common.progress)
    return load_trajectory(path, adapters=explicit, format_name=src.format_name, source_label=label, max_step=max_step)


def run_settings(compute: ComputeArgs, common: Common, predictor_args: PredictorArgs | None = None):
    """The pipeline's settings from the compute and predictor options."""
    from nextoffline.ops.device import resolve_device
    from nextoffline.ops.predictors import NextOptions, PredictorOptions
    from nextoffline.pipeline import RunSettings

    args = predictor_args or PredictorArgs(None, NextOptions.epochs)
    predictors = PredictorOptions(horizon=args.horizon, next=NextOptions(epochs=args.next_epochs))
    chunk_bytes = compute.chunk_mb * 2**20
    return RunSettings(device=resolve_device(compute.device), chunk_bytes=chunk_bytes, progress=common.progress, predictors=predictors)


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
