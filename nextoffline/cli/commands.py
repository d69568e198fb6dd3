"""Thin click commands: parse, call the library, report."""

from __future__ import annotations

from pathlib import Path

import click

from nextoffline.cli.options import (
    Common,
    command_line,
    common_options,
    compute_options,
    echo_json,
    parse_float_list,
    resolve_source,
    source_options,
)

__all__ = ["backtest_cmd", "extrapolate_cmd", "inspect_cmd", "push_cmd"]


def _load(source, adapters, format_name, token, common: Common, *, trainer_state: bool = False):
    from nextoffline.trajectory import load_trajectory

    path, explicit, label = resolve_source(source, adapters, token=token, trainer_state=trainer_state, progress=common.progress)
    return load_trajectory(path, adapters=explicit, format_name=format_name, source_label=label)


def _settings(device: str, chunk_mb: int, common: Common, **extra):
    from nextoffline.ops.device import resolve_device
    from nextoffline.pipeline import RunSettings

    return RunSettings(device=resolve_device(device), chunk_bytes=chunk_mb * 2**20, progress=common.progress, **extra)


@click.command("inspect")
@source_options
@compute_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@common_options
def inspect_cmd(source, adapters, format_name, token, device, chunk_mb, as_json, common: Common) -> None:
    """Show what a trajectory holds: layout, steps, modules, rank, rank-1 dominance."""
    from nextoffline.cli.render import render_inspect
    from nextoffline.pipeline import inspect_trajectory

    trajectory = _load(source, adapters, format_name, token, common)
    report = inspect_trajectory(trajectory, _settings(device, chunk_mb, common))
    echo_json(report) if as_json else click.echo(render_inspect(report))


@click.command("backtest")
@source_options
@compute_options
@click.option("--holdout", default=2, show_default=True, type=click.IntRange(1), help="Checkpoints held out at the end.")
@click.option("--methods", default=None, help="Comma list of predictors (default: every auto candidate).")
@click.option("--horizon", type=click.IntRange(1), default=None, help="NExt horizon in checkpoints (default: min(5, (K-2)//2)).")
@click.option("--next-epochs", type=click.IntRange(1), default=1000, show_default=True, help="NExt training epochs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
def backtest_cmd(
    source, adapters, format_name, token, device, chunk_mb, holdout, methods, horizon, next_epochs, as_json, common: Common
) -> None:
    """Fit each predictor on a prefix and score its prediction of the held-out tail (1.0 = no better than stopping)."""
    from nextoffline.cli.render import render_backtest
    from nextoffline.ops.predictors import auto_candidates, parse_predictor_name
    from nextoffline.pipeline import backtest

    trajectory = _load(source, adapters, format_name, token, common)
    names = [m.strip() for m in methods.split(",")] if methods else auto_candidates(len(trajectory.steps) - holdout)
    for name in names:
        parse_predictor_name(name)
    settings = _settings(device, chunk_mb, common, horizon=horizon, next_options={"epochs": next_epochs})
    result = backtest(trajectory, names, settings, holdout=holdout)
    echo_json(result.to_json()) if as_json else click.echo(render_backtest(result))


@click.command("extrapolate")
@source_options
@compute_options
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder (created atomically).")
@click.option("--to-step", "to_step", default=None, help="Target step(s), comma list.")
@click.option("--coef", default=None, help="Coefficient(s) in horizons, comma list (0 = latest checkpoint).")
@click.option("--method", default="auto", show_default=True, help="auto, linear, power, poly, gp, next (NAME@W sets a window).")
@click.option(
    "--rank-policy",
    type=click.Choice(["keep", "grow"]),
    default="keep",
    show_default=True,
    help="keep rank r (resumable) or write r+1 exactly.",
)
@click.option("--holdout", default=2, show_default=True, type=click.IntRange(1), help="Checkpoints held out by the auto backtest.")
@click.option("--horizon", type=click.IntRange(1), default=None, help="Horizon in checkpoints (default: min(5, (K-2)//2)).")
@click.option("--next-epochs", type=click.IntRange(1), default=1000, show_default=True, help="NExt training epochs.")
@click.option("--resumable", is_flag=True, help="Also write a checkpoint in the trainer's own layout under OUT/resume/.")
@click.option("--eval-cmd", default=None, help="Score each candidate: a command with {adapter}; its last line is a number.")
@click.option("--eval-lower-is-better", is_flag=True, help="With --eval-cmd: lower scores are better.")
@click.option(
    "--eval-timeout", default=3600.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds per evaluation."
)
@click.option("--keep-all", is_flag=True, help="With --eval-cmd: keep every candidate, not only the best.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@common_options
def extrapolate_cmd(
    source,
    adapters,
    format_name,
    token,
    device,
    chunk_mb,
    out_dir,
    to_step,
    coef,
    method,
    rank_policy,
    holdout,
    horizon,
    next_epochs,
    resumable,
    eval_cmd,
    eval_lower_is_better,
    eval_timeout,
    keep_all,
    overwrite,
    as_json,
    common: Common,
) -> None:
    """Predict the adapter at a later step and write it (PEFT layout; --resumable adds the trainer's layout)."""
    from nextoffline.cli.render import render_extrapolation
    from nextoffline.errors import UsageError
    from nextoffline.io.writer import check_output_location
    from nextoffline.ops.predictors import parse_predictor_name
    from nextoffline.sweep import EvalSpec, run_extrapolate

    coefs, steps = parse_float_list(coef, "--coef"), parse_float_list(to_step, "--to-step")
    if (keep_all or eval_lower_is_better) and not eval_cmd:
        raise UsageError(
            f"{'--keep-all' if keep_all else '--eval-lower-is-better'} only applies with --eval-cmd; "
            "without it every candidate of a sweep is written"
        )
    if resumable and rank_policy == "grow":
        raise UsageError("--resumable keeps the rank so the optimizer state still fits; drop --rank-policy grow")
    if method != "auto":
        parse_predictor_name(method)
    trajectory = _load(source, adapters, format_name, token, common, trainer_state=resumable)
    check_output_location(out_dir, sources=(trajectory.source, *(r.checkpoint_dir for r in trajectory.steps)), overwrite=overwrite)
    settings = _settings(device, chunk_mb, common, horizon=horizon, next_options={"epochs": next_epochs})
    evaluation = EvalSpec(eval_cmd, lower_is_better=eval_lower_is_better, timeout=eval_timeout, keep_all=keep_all) if eval_cmd else None
    summary = run_extrapolate(
        trajectory,
        settings,
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
    )
    echo_json(summary) if as_json else click.echo(render_extrapolation(summary))


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Target repo, owner/name (created if missing).")
@click.option("--branch", default=None, help="Branch to commit to (created if missing; default main).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--token", default=None, envvar="HF_TOKEN", help="Hugging Face token (default: $HF_TOKEN).")
@click.option("--commit-message", default=None, help="Commit message (default names the source and predictor).")
@common_options
def push_cmd(folder: Path, repo_id, branch, private, token, commit_message, common: Common) -> None:
    """Upload an extrapolated adapter folder to the Hugging Face Hub in one commit; print its URL."""
    import json

    from nextoffline import hub
    from nextoffline.errors import OutputError

    manifest_path = folder / "nextoffline.json"
    if not (folder / "adapter_model.safetensors").is_file() or not manifest_path.is_file():
        raise OutputError(
            f"{folder}: not an extrapolated adapter folder (adapter_model.safetensors and nextoffline.json expected); "
            "pass the --out folder of `nextoffline extrapolate`"
        )
    if commit_message is None:
        manifest = json.loads(manifest_path.read_text())
        commit_message = (
            f"nextoffline: {manifest['extrapolation']['method']} extrapolation of {manifest['source']['label']} "
            f"to step {manifest['selected']['step']:g}"
        )
    url = hub.push_folder(folder, repo_id=repo_id, branch=branch, private=private, token=token, commit_message=commit_message)
    click.echo(url)


EXAMPLE_TRAJECTORY = Path(__file__).resolve().parent.parent / "data" / "example_grpo"


@click.command("demo")
@click.option("--out", "out_dir", default="nextoffline-demo", show_default=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--next-epochs", type=click.IntRange(1), default=200, show_default=True, help="NExt training epochs.")
@common_options
def demo_cmd(out_dir: Path, device: str, next_epochs: int, common: Common) -> None:
    """Run inspect, backtest and a resumable extrapolation on the bundled TRL GRPO example run."""
    from nextoffline.cli.render import render_backtest, render_extrapolation, render_inspect
    from nextoffline.ops.predictors import auto_candidates
    from nextoffline.pipeline import backtest, inspect_trajectory
    from nextoffline.sweep import run_extrapolate
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(EXAMPLE_TRAJECTORY, source_label="bundled example (TRL GRPO + LoRA, tiny model)")
    settings = _settings(device, 256, common, next_options={"epochs": next_epochs})
    click.echo("== inspect\n" + render_inspect(inspect_trajectory(trajectory, settings)))
    result = backtest(trajectory, auto_candidates(len(trajectory.steps) - 2), settings)
    click.echo("\n== backtest\n" + render_backtest(result))
    summary = run_extrapolate(
        trajectory,
        settings,
        out_dir=out_dir,
        method="auto",
        coefs=[1.0],
        to_steps=[],
        rank_policy="keep",
        holdout=2,
        resumable=True,
        overwrite=(out_dir / "nextoffline.json").is_file(),  # only replace an earlier output
        evaluation=None,
        command=command_line(),
    )
    click.echo("\n== extrapolate (auto, coefficient 1)\n" + render_extrapolation(summary))
