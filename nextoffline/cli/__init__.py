"""Command line interface: ``nextoffline {inspect,backtest,extrapolate,watch,report,push}``."""

from __future__ import annotations

import click

from nextoffline import __version__
from nextoffline.cli.commands import backtest_cmd, demo_cmd, extrapolate_cmd, inspect_cmd, push_cmd
from nextoffline.cli.report_cmd import report_cmd
from nextoffline.cli.watch_cmd import watch_cmd

__all__ = ["main", "run"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="nextoffline")
def main() -> None:
    """Extrapolate LoRA training trajectories from saved checkpoints (verl, OpenRLHF, TRL, PEFT, hf://)."""


main.add_command(inspect_cmd)
main.add_command(backtest_cmd)
main.add_command(extrapolate_cmd)
main.add_command(push_cmd)
main.add_command(demo_cmd)
main.add_command(report_cmd)
main.add_command(watch_cmd)


def run() -> None:
    """Process entry point (the ``nextoffline`` script and ``python -m nextoffline``)."""
    from nextoffline.cli.options import PROCESS

    PROCESS.entry = True
    main(prog_name="nextoffline")
