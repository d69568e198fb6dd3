"""Click options of horizon-matched selection (rolling origins, time axes, damping, NExt budget)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from nextoffline.errors import UsageError

__all__ = ["forecast_options"]


def _axes(text: str) -> tuple[str, ...]:
    from nextoffline.ops.forecast import TIME_AXES

    axes = tuple(a.strip() for a in text.split(",") if a.strip())
    for axis in axes:
        if axis not in TIME_AXES:
            raise UsageError(f"--time-axes {text!r}: {axis!r} is not a time axis; use a comma list of {', '.join(TIME_AXES)}")
    if "step" not in axes:
        axes = ("step", *axes)
    return axes


def forecast_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the options and passes ``forecast=ForecastOptions(...)`` to the command."""

    @click.option("--origins", type=click.IntRange(1), default=3, show_default=True, help="Rolling backtest origins per target lead.")
    @click.option(
        "--time-axes",
        default="step,log,lr",
        show_default=True,
        help="Time axes auto tries for trends: step, log (log-step), lr (cumulative learning rate, where logged).",
    )
    @click.option("--no-damping", is_flag=True, help="Apply forecasts undamped (default: damping chosen per target on the backtest).")
    @click.option(
        "--next-budget",
        type=click.FloatRange(min=0),
        default=120.0,
        show_default=True,
        help="auto skips NExt when its projected training time exceeds this many seconds.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, origins: int, time_axes: str, no_damping: bool, next_budget: float, **kwargs: Any) -> Any:
        from nextoffline.forecasting import ForecastOptions

        options = ForecastOptions(origins=origins, time_axes=_axes(time_axes), damping=not no_damping, next_budget_s=next_budget)
        return func(*args, forecast=options, **kwargs)

    return wrapper
