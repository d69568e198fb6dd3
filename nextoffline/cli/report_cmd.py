"""``nextoffline report``: plots and a Markdown summary of a trajectory (optional extra ``report``)."""

from __future__ import annotations

from pathlib import Path

import click

from nextoffline.cli.options import (
    Common,
    ComputeArgs,
    FullArgs,
    PredictorArgs,
    SourceArgs,
    common_options,
    compute_options,
    full_options,
    holdout_option,
    load_source,
    out_option,
    overwrite_option,
    predictor_options,
    run_settings,
    source_options,
)

__all__ = ["report_cmd"]


@click.command("report")
@source_options
@compute_options
@out_option
@click.option(
    "--extrapolation",
    "extrapolation_dir",
    default=None,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="An earlier `extrapolate` --out folder: show its candidates and scores.",
)
@click.option(
    "--methods",
    default=",".join(("linear", "power", "poly", "gp", "next")),
    show_default=True,
    help="Predictors drawn on the coefficient plots (comma list, NAME@W sets a window).",
)
@click.option("--backtest-methods", default=None, help="Predictors backtested (default: every auto candidate).")
@holdout_option
@predictor_options
@click.option("--modules", "module_pattern", default=None, help="Regex selecting the modules to plot (default: spread over the model).")
@click.option("--max-modules", default=9, show_default=True, type=click.IntRange(1, 36), help="Most modules on the coefficient plot.")
@click.option("--to-step", "end_step", type=float, default=None, help="Draw the predictions up to this step (default: 2 horizons ahead).")
@overwrite_option
@full_options
@common_options
def report_cmd(
    src: SourceArgs,
    compute: ComputeArgs,
    out_dir: Path,
    extrapolation_dir: Path | None,
    methods: str,
    backtest_methods: str | None,
    holdout: int,
    predictor_args: PredictorArgs,
    module_pattern: str | None,
    max_modules: int,
    end_step: float | None,
    overwrite: bool,
    full_args: FullArgs,
    common: Common,
) -> None:
    """Write PNG plots and report.md: rank-1 energy, per-module coefficient fits, backtest errors, candidate scores."""
    from nextoffline.dense.commands import dense_report_data, wants_dense
    from nextoffline.io.writer import check_output_location
    from nextoffline.output import output_sources
    from nextoffline.report import compute_report, require_matplotlib, write_report

    require_matplotlib()  # fail before any work
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    backtest_list = [m.strip() for m in backtest_methods.split(",") if m.strip()] if backtest_methods else None
    options = {
        "methods": method_list,
        "backtest_methods": backtest_list,
        "holdout": holdout,
        "module_pattern": module_pattern,
        "max_modules": max_modules,
        "end_step": end_step,
        "extrapolation_dir": extrapolation_dir,
    }
    if wants_dense(src, full_args):  # full-parameter hook
        data = dense_report_data(
            src,
            full_args,
            compute,
            out_dir=out_dir,
            overwrite=overwrite,
            progress=common.progress,
            horizon=predictor_args.horizon,
            **options,
        )
    else:
        trajectory = load_source(src, common)
        check_output_location(out_dir, sources=output_sources(trajectory), overwrite=overwrite)  # once, before the work
        data = compute_report(trajectory, run_settings(compute, common, predictor_args), **options)
    files = write_report(out_dir, data, overwrite=overwrite)
    click.echo(f"wrote {files['markdown']}")
    for key, path in files.items():
        if key not in ("markdown",):
            click.echo(f"  {path.name}")
