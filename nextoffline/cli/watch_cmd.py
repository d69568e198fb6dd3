"""``nextoffline watch``: wait for a running trainer's checkpoint, then ``extrapolate --resumable`` it."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from nextoffline.cli.commands import extrapolate_cmd
from nextoffline.cli.options import Common, common_options
from nextoffline.errors import UsageError

__all__ = ["watch_cmd"]

#: ``extrapolate`` options that ``watch`` sets itself (the rest are shared as declared there).
_OWN = {"source", "adapters", "token", "resumable", "max_step", "verbose", "quiet"}


def _parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise UsageError(f"--at-step {text!r}: give step numbers separated by commas, e.g. --at-step 100,200") from None
    if steps[0] < 1:
        raise UsageError(f"--at-step {text!r}: steps must be positive")
    return steps


@click.command("watch")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--at-step", "at_steps", required=True, help="Step(s) to extrapolate at, comma list (OUT/step_N/ each when several).")
@click.option("--exec", "exec_cmd", default=None, help="Shell command run after each output ({out}, {checkpoint}, {step} replaced).")
@click.option("--timeout", default=86400.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds to wait in all.")
@click.option("--poll", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds between looks.")
@common_options
def watch_cmd(run_dir: Path, at_steps: str, exec_cmd: str | None, timeout: float, poll: float, common: Common, **options) -> None:
    """Wait until checkpoint N of a running trainer is complete, then write a resumable extrapolation of it.

    Completeness: the trainer's marker (verl latest_checkpointed_iteration.txt, DeepSpeed/OpenRLHF
    _actor/latest, TRL trainer_state.json) names the step, and its files stop changing. Takes every
    `extrapolate` option; the output is `extrapolate --resumable --max-step N` of RUN_DIR.
    """
    from nextoffline.integrations.watch import wait_for_step
    from nextoffline.io.writer import check_output_location

    steps = _parse_steps(at_steps)
    if not options["coef"] and not options["to_step"]:  # fail now, not hours later when the step arrives
        raise UsageError("give --coef C or --to-step N (comma lists allowed), as for extrapolate")
    out_root: Path = options["out_dir"]
    check_output_location(out_root, sources=(run_dir,), overwrite=options["overwrite"])
    deadline = time.monotonic() + timeout
    ctx = click.get_current_context()
    for step in steps:
        remaining = max(deadline - time.monotonic(), 1e-3)
        layout = wait_for_step(run_dir, step, format_name=options["format_name"], timeout=remaining, poll=poll)
        out = out_root if len(steps) == 1 else out_root / f"step_{step}"
        click.echo(f"checkpoint {step} of {run_dir} is complete ({layout}); extrapolating to {out}", err=True)
        shared = {**options, "out_dir": out, "format_name": layout}
        ctx.invoke(
            extrapolate_cmd,
            source=str(run_dir),
            adapters=(),
            token=None,
            resumable=True,
            max_step=step,
            verbose=common.verbose,
            quiet=common.quiet,
            **shared,
        )
        if exec_cmd:
            _run_exec(exec_cmd, out, step)


def _run_exec(template: str, out: Path, step: int) -> None:
    """Run the user's command (e.g. a resume launcher); its failure ends ``watch`` with its exit code."""
    from nextoffline.artifacts import read_manifest

    resume = read_manifest(out).resume or {}
    checkpoint = out / resume["checkpoint_dir"] if resume.get("checkpoint_dir") else out
    command = (
        template.replace("{out}", shlex.quote(str(out))).replace("{checkpoint}", shlex.quote(str(checkpoint))).replace("{step}", str(step))
    )
    env = {**os.environ, "NEXTOFFLINE_OUT": str(out), "NEXTOFFLINE_CHECKPOINT": str(checkpoint), "NEXTOFFLINE_STEP": str(step)}
    click.echo(f"$ {command}", err=True)
    code = subprocess.run(command, shell=True, env=env).returncode
    if code:
        click.echo(f"error: --exec command exited with code {code}: {command}", err=True)
        sys.exit(code)


def _share_extrapolate_options() -> None:
    """Declare once: every ``extrapolate`` option (method, coefficients, eval, ...) is a ``watch`` option too."""
    shared = [copy.copy(p) for p in extrapolate_cmd.params if p.name not in _OWN]
    common = [p for p in watch_cmd.params if p.name in ("verbose", "quiet")]
    watch_cmd.params = [p for p in watch_cmd.params if p not in common] + shared + common


_share_extrapolate_options()
