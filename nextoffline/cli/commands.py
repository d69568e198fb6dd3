"""Thin click commands: parse, call the library, report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from nextoffline.cli.forecast_options import forecast_options
from nextoffline.cli.options import (
    Common,
    ComputeArgs,
    FullArgs,
    PredictorArgs,
    SourceArgs,
    command_line,
    common_options,
    compute_options,
    device_option,
    echo_json,
    full_options,
    holdout_option,
    json_option,
    load_source,
    next_epochs_option,
    out_option,
    overwrite_option,
    parse_float_list,
    predictor_options,
    run_settings,
    source_options,
    token_option,
)

if TYPE_CHECKING:
    from nextoffline.forecasting import ForecastOptions

__all__ = ["backtest_cmd", "demo_cmd", "extrapolate_cmd", "inspect_cmd", "push_cmd"]


@click.command("inspect")
@source_options
@compute_options
@json_option
@full_options
@common_options
def inspect_cmd(src: SourceArgs, compute: ComputeArgs, as_json: bool, full_args: FullArgs, common: Common) -> None:
    """Show what a trajectory holds: layout, steps, modules, rank, rank-1 dominance."""
    from nextoffline.cli.render import render_inspect
    from nextoffline.dense.commands import dense_inspect_cmd, wants_dense
    from nextoffline.pipeline import inspect_trajectory

    if wants_dense(src, full_args):  # full-parameter hook
        return dense_inspect_cmd(src, full_args, compute, as_json, common.progress)
    trajectory = load_source(src, common)
    report = inspect_trajectory(trajectory, run_settings(compute, common))
    echo_json(report) if as_json else click.echo(render_inspect(report))


@click.command("backtest")
@source_options
@compute_options
@holdout_option
@click.option("--methods", default=None, help="Comma list of predictors, NAME[@W][:AXIS] (default: every auto candidate).")
@click.option("--to-step", "to_step", default=None, help="Also score rolling origins at these targets' leads (comma list).")
@click.option("--coef", default=None, help="Targets as coefficients in horizons (comma list), as extrapolate takes them.")
@predictor_options
@forecast_options
@json_option
@full_options
@common_options
def backtest_cmd(
    src: SourceArgs,
    compute: ComputeArgs,
    holdout: int,
    methods: str | None,
    to_step: str | None,
    coef: str | None,
    predictor_args: PredictorArgs,
    forecast: ForecastOptions,
    as_json: bool,
    full_args: FullArgs,
    common: Common,
) -> None:
    """Fit each predictor on prefixes and score its predictions of later checkpoints (1.0 = no better than stopping).

    With --to-step/--coef: rolling origins at each target's lead, the damping each predictor
    would get and its error band.
    """
    from nextoffline.cli.render import render_backtest
    from nextoffline.dense.commands import dense_backtest_cmd, wants_dense

    if wants_dense(src, full_args):  # full-parameter hook
        return dense_backtest_cmd(
            src, full_args, compute, holdout, methods, as_json, common.progress, predictor_args=predictor_args, forecast=forecast
        )
    from nextoffline.ops.predictors import auto_candidates, parse_predictor_name
    from nextoffline.pipeline import backtest, resolve_targets

    trajectory = load_source(src, common)
    k = len(trajectory.steps)
    names = [m.strip() for m in methods.split(",")] if methods else auto_candidates(k - holdout, axes=forecast.time_axes)
    for name in names:
        parse_predictor_name(name)
    coefs, steps = parse_float_list(coef, "--coef"), parse_float_list(to_step, "--to-step")
    settings = run_settings(compute, common, predictor_args)
    targets = []
    if coefs or steps:
        targets = [t.step for t in resolve_targets(trajectory, horizon=settings.horizon_for(k), coefs=coefs, to_steps=steps)]
    result = backtest(trajectory, names, settings, holdout=holdout, targets=targets, forecast=forecast, budget_next=not methods)
    echo_json(result.to_json()) if as_json else click.echo(render_backtest(result))


@click.command("extrapolate")
@source_options
@compute_options
@out_option
@click.option("--to-step", "to_step", default=None, help="Target step(s), comma list.")
@click.option("--coef", default=None, help="Coefficient(s) in horizons, comma list (0 = latest checkpoint).")
@click.option(
    "--method", default="auto", show_default=True, help="auto or a predictor NAME[@W][:AXIS] (see README), e.g. linear@5:lr, next."
)
@click.option(
    "--rank-policy",
    type=click.Choice(["keep", "grow"]),
    default="keep",
    show_default=True,
    help="keep rank r (resumable) or write r+1 exactly.",
)
@holdout_option
@predictor_options
@forecast_options
@click.option("--resumable", is_flag=True, help="Also write a checkpoint in the trainer's own layout under OUT/resume/.")
@click.option("--eval-cmd", default=None, help="Score each candidate: a command with {adapter}; its last line is a number.")
@click.option("--eval-lower-is-better", is_flag=True, help="With --eval-cmd: lower scores are better.")
@click.option(
    "--eval-timeout", default=3600.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds per evaluation."
)
@click.option("--keep-all", is_flag=True, help="With --eval-cmd: keep every candidate, not only the best.")
@overwrite_option
@click.option("--max-step", type=click.IntRange(0), default=None, help="Ignore checkpoints saved after this step.")
@json_option
@full_options
@common_options
def extrapolate_cmd(
    src: SourceArgs,
    compute: ComputeArgs,
    out_dir: Path,
    to_step: str | None,
    coef: str | None,
    method: str,
    rank_policy: str,
    holdout: int,
    predictor_args: PredictorArgs,
    forecast: ForecastOptions,
    resumable: bool,
    eval_cmd: str | None,
    eval_lower_is_better: bool,
    eval_timeout: float,
    keep_all: bool,
    overwrite: bool,
    max_step: int | None,
    as_json: bool,
    full_args: FullArgs,
    common: Common,
) -> None:
    """Predict the adapter at a later step and write it (PEFT layout; --resumable adds the trainer's layout).

    Full-parameter runs (probed, or --full) write a whole HF model folder; run under
    `torchrun --nproc_per_node G -m nextoffline extrapolate ...` to spread the tensors over processes.
    """
    from nextoffline.cli.render import extrapolation_summary, render_extrapolation
    from nextoffline.dense.commands import dense_extrapolate_cmd, wants_dense
    from nextoffline.errors import UsageError
    from nextoffline.evaluation import EvalSpec
    from nextoffline.extrapolate_job import ExtrapolateRequest, run_extrapolate
    from nextoffline.ops.predictors import parse_predictor_name

    coefs, steps = parse_float_list(coef, "--coef"), parse_float_list(to_step, "--to-step")
    if (keep_all or eval_lower_is_better) and not eval_cmd:
        raise UsageError(
            f"{'--keep-all' if keep_all else '--eval-lower-is-better'} only applies with --eval-cmd; "
            "without it every candidate of a sweep is written"
        )
    evaluation = EvalSpec(eval_cmd, lower_is_better=eval_lower_is_better, timeout=eval_timeout, keep_all=keep_all) if eval_cmd else None
    if wants_dense(src, full_args):  # full-parameter hook
        if rank_policy != "keep":
            raise UsageError("--rank-policy applies to LoRA factors; a full-parameter run writes whole weights: drop it")
        return dense_extrapolate_cmd(
            src,
            full_args,
            compute,
            as_json=as_json,
            max_step=max_step,
            out_dir=out_dir,
            method=method,
            coefs=coefs,
            to_steps=steps,
            holdout=holdout,
            horizon=predictor_args.horizon,
            resumable=resumable,
            overwrite=overwrite,
            command=command_line(),
            progress=common.progress,
            evaluation=evaluation,
            next_epochs=predictor_args.next_epochs,
            next_budget_s=forecast.next_budget_s,
        )
    if resumable and rank_policy == "grow":
        raise UsageError("--resumable keeps the rank so the optimizer state still fits; drop --rank-policy grow")
    if method != "auto":
        parse_predictor_name(method)
    trajectory = load_source(src, common, trainer_state=resumable, max_step=max_step)
    settings = run_settings(compute, common, predictor_args)
    request = ExtrapolateRequest(
        out_dir=out_dir,
        method=method,
        coefs=coefs,
        to_steps=steps,
        rank_policy=rank_policy,
        holdout=holdout,
        resumable=resumable,
        overwrite=overwrite,
        evaluation=evaluation,
        command=command_line(),
        forecast=forecast,
    )
    summary = extrapolation_summary(run_extrapolate(trajectory, settings, request))
    echo_json(summary) if as_json else click.echo(render_extrapolation(summary))


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Target repo, owner/name (created if missing).")
@click.option("--branch", default=None, help="Branch to commit to (created if missing; default main).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@token_option
@click.option("--commit-message", default=None, help="Commit message (default names the source and predictor).")
@common_options
def push_cmd(folder: Path, repo_id, branch, private, token, commit_message, common: Common) -> None:
    """Upload an extrapolated adapter or full-parameter model folder to the Hugging Face Hub in one commit; print its URL."""
    from nextoffline import hub
    from nextoffline.artifacts import ADAPTER_WEIGHTS_NAME, MANIFEST_NAME, is_output_folder, read_manifest
    from nextoffline.dense.commands import dense_push_message
    from nextoffline.errors import OutputError

    dense_message = dense_push_message(folder)  # full-parameter hook
    if dense_message is None and not is_output_folder(folder):
        raise OutputError(
            f"{folder}: not an extrapolated adapter or model folder ({ADAPTER_WEIGHTS_NAME} or model*.safetensors, and "
            f"{MANIFEST_NAME} expected); pass the --out folder of `nextoffline extrapolate`"
        )
    if commit_message is None and dense_message is not None:
        commit_message = dense_message
    if commit_message is None:
        manifest = read_manifest(folder)
        commit_message = (
            f"nextoffline: {manifest.extrapolation['method']} extrapolation of {manifest.source['label']} "
            f"to step {manifest.selected['step']:g}"
        )
    url = hub.push_folder(folder, repo_id=repo_id, branch=branch, private=private, token=token, commit_message=commit_message)
    click.echo(url)


EXAMPLE_TRAJECTORY = Path(__file__).resolve().parent.parent / "data" / "example_grpo"


@click.command("demo")
@click.option("--out", "out_dir", default="nextoffline-demo", show_default=True, type=click.Path(path_type=Path), help="Output folder.")
@device_option
@next_epochs_option(default=200)
@common_options
def demo_cmd(out_dir: Path, device: str, next_epochs: int, common: Common) -> None:
    """Run inspect, backtest and a resumable extrapolation on the bundled TRL GRPO example run."""
    from nextoffline.artifacts import MANIFEST_NAME
    from nextoffline.cli.render import extrapolation_summary, render_backtest, render_extrapolation, render_inspect
    from nextoffline.extrapolate_job import ExtrapolateRequest, run_extrapolate
    from nextoffline.ops.predictors import auto_candidates
    from nextoffline.pipeline import backtest, inspect_trajectory
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(EXAMPLE_TRAJECTORY, source_label="bundled example (TRL GRPO + LoRA, tiny model)")
    settings = run_settings(ComputeArgs(device, 256), common, PredictorArgs(None, next_epochs))
    click.echo("== inspect\n" + render_inspect(inspect_trajectory(trajectory, settings)))
    result = backtest(trajectory, auto_candidates(len(trajectory.steps) - 2), settings)
    click.echo("\n== backtest\n" + render_backtest(result))
    request = ExtrapolateRequest(
        out_dir=out_dir,
        coefs=[1.0],
        resumable=True,
        overwrite=(out_dir / MANIFEST_NAME).is_file(),  # only replace an earlier output
        command=command_line(),
    )
    summary = extrapolation_summary(run_extrapolate(trajectory, settings, request))
    click.echo("\n== extrapolate (auto, coefficient 1)\n" + render_extrapolation(summary))
