"""Selection as forecasting: time axes, rolling origins at a lead, damping and error bands.

Pure arithmetic on step numbers and backtest sums (no tensors of weights, no files):

* a :class:`TimeAxis` maps training steps to the coordinate a trend is fitted in: the step,
  its logarithm, or the cumulative learning rate (warmup and decay then do not bend a trend
  that is linear in the optimiser's progress);
* :func:`rolling_origins` picks the fit/predict origins of a rolling-origin backtest at a lead
  (in checkpoints): each fit sees only checkpoints up to its origin;
* :class:`PairSums` holds, for one candidate and one (origin, target) pair, the sums over modules
  ``|D|^2``, ``<D, T>``, ``|T|^2`` and ``|D - T|^2`` of its predicted update ``D`` and the true one
  ``T``; every damped error ``|a D - T|`` follows from them (:func:`damped_score`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "TIME_AXES",
    "DampedScore",
    "PairSums",
    "TimeAxis",
    "damped_score",
    "lead_in_checkpoints",
    "origin_grid",
    "rolling_origins",
]

#: Time axes a trend can be fitted in.
TIME_AXES = ("step", "log", "lr")


class TimeAxis:
    """A monotone map from training steps to a trend coordinate.

    Args:
        kind: ``step`` (identity), ``log`` (``log(step + 1)``) or ``lr`` (cumulative learning
            rate: the integral of the piecewise-linear learning rate through ``lr_points``).
        lr_points: ``(step, learning rate)`` pairs, increasing steps (needed for ``lr``).
            Before the first point the first rate holds; after the last one the rate follows the
            line through the last two points (a linear decay stays exact), never below zero.
    """

    def __init__(self, kind: str = "step", lr_points: Sequence[tuple[float, float]] = ()) -> None:
        if kind not in TIME_AXES:
            raise ValueError(f"time axis {kind!r}: use one of {', '.join(TIME_AXES)}")
        if kind == "lr" and not lr_points:
            raise ValueError("the lr time axis needs logged learning rates")
        self.kind = kind
        points = sorted({float(s): float(v) for s, v in lr_points}.items())
        self._steps = [s for s, _ in points]
        self._rates = [max(v, 0.0) for _, v in points]
        self._cumulative = [self._steps[0] * self._rates[0]] if points else [0.0]
        for i in range(1, len(points)):
            self._cumulative.append(
                self._cumulative[-1] + 0.5 * (self._rates[i] + self._rates[i - 1]) * (self._steps[i] - self._steps[i - 1])
            )

    def __call__(self, step: float) -> float:
        if self.kind == "step":
            return float(step)
        if self.kind == "log":
            return math.log1p(max(float(step), 0.0))
        return self._integral(float(step))

    def map(self, steps: Sequence[float]) -> list[float]:
        return [self(s) for s in steps]

    def _integral(self, step: float) -> float:
        s, r, c = self._steps, self._rates, self._cumulative
        if step <= s[0] or len(s) == 1:
            return step * r[0]  # the first logged rate holds from step 0 to the first log
        if step <= s[-1]:
            i = bisect.bisect_right(s, step) - 1
            i = min(i, len(s) - 2)
            width = s[i + 1] - s[i]
            rate = r[i] + (r[i + 1] - r[i]) * (step - s[i]) / width if width > 0 else r[i]
            return c[i] + 0.5 * (r[i] + rate) * (step - s[i])
        slope = (r[-1] - r[-2]) / (s[-1] - s[-2]) if len(s) > 1 and s[-1] > s[-2] else 0.0
        if slope >= 0:
            return c[-1] + (step - s[-1]) * (r[-1] + 0.5 * slope * (step - s[-1]))
        until_zero = min(step - s[-1], r[-1] / -slope)
        return c[-1] + until_zero * (r[-1] + 0.5 * slope * until_zero)

    def describe(self) -> str:
        return {"step": "training step", "log": "log(step + 1)", "lr": "cumulative learning rate"}[self.kind]


def lead_in_checkpoints(steps: Sequence[float], target_step: float) -> int:
    """Checkpoints between the last one and ``target_step`` at the mean saved cadence (>= 0)."""
    if target_step <= steps[-1]:
        return 0
    spacing = (steps[-1] - steps[0]) / max(len(steps) - 1, 1)
    return max(1, round((target_step - steps[-1]) / spacing)) if spacing > 0 else 1


def origin_grid(num_steps: int, *, min_fit: int = 3, size: int = 6) -> list[int]:
    """Candidate origins (index of the last fitted checkpoint), evenly spread over
    ``min_fit - 1 .. num_steps - 2`` (at most ``size``), shared by every lead so that each
    predictor is fitted on few prefixes."""
    lo, hi = min_fit - 1, num_steps - 2
    if hi < lo:
        return []
    count = min(size, hi - lo + 1)
    if count == 1:
        return [hi]
    return sorted({round(hi - i * (hi - lo) / (count - 1)) for i in range(count)})


def rolling_origins(num_steps: int, lead: int, grid: Sequence[int], *, origins: int = 4) -> tuple[int, list[int]]:
    """``(scored lead, origins)`` of a rolling-origin backtest at ``lead`` checkpoints.

    Each origin ``o`` is fitted on checkpoints ``0..o`` and scored at ``o + lead``; the latest
    ``origins`` grid points with ``o + lead <= num_steps - 1`` are used. A lead longer than the
    run allows is shortened to the longest one the earliest origin can score (and reported).
    """
    if lead < 1 or not grid:
        return lead, []
    usable = [o for o in grid if o + lead <= num_steps - 1]
    if not usable:
        return num_steps - 1 - grid[0], [grid[0]]
    return lead, sorted(usable)[-origins:]


@dataclass
class PairSums:
    """Sums over modules for one predicted update ``D`` and the true update ``T`` of one pair."""

    dd: float
    dt: float
    tt: float
    #: ``|D - T|^2`` computed directly (no cancellation; equals ``dd - 2 dt + tt``)
    error: float

    def at(self, damping: float) -> float:
        """``|a D - T|^2``."""
        if damping == 1.0:
            return max(self.error, 0.0)
        return max(damping * damping * self.dd - 2 * damping * self.dt + self.tt, 0.0)


@dataclass
class DampedScore:
    """A candidate's rolling-origin score at one lead.

    ``error`` is undamped (``a = 1``), ``damped_error`` is scored with each origin's damping
    chosen on the other origins (leave one out; in-sample with a single origin), ``damping``
    is chosen on all of them; errors are ``sqrt(sum |a D - T|^2 / sum |T|^2)`` (1.0 = stopping).
    ``band`` is the (lowest, highest) per-origin damped error ratio.
    """

    error: float
    damped_error: float
    damping: float
    band: tuple[float, float]
    per_origin: list[float]


def _best_damping(pairs: Sequence[PairSums]) -> float:
    dd = sum(p.dd for p in pairs)
    dt = sum(p.dt for p in pairs)
    if not dd > 0 or not math.isfinite(dd) or not math.isfinite(dt):
        return 0.0
    return min(max(dt / dd, 0.0), 1.0)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return math.sqrt(max(num, 0.0) / den)
    return 1.0 if num <= 0 else math.inf


def damped_score(pairs: Sequence[PairSums], *, damping: bool = True) -> DampedScore:
    """Undamped and damped errors of one candidate over its origins at one lead."""
    if not pairs:
        return DampedScore(1.0, 1.0, 0.0, (1.0, 1.0), [])
    tt = sum(p.tt for p in pairs)
    undamped = _ratio(sum(p.at(1.0) for p in pairs), tt)
    if not damping:
        per = [_ratio(p.at(1.0), p.tt) for p in pairs]
        return DampedScore(undamped, undamped, 1.0, (min(per), max(per)), per)
    chosen = _best_damping(pairs)
    held_out = []
    for i, pair in enumerate(pairs):
        others = [p for j, p in enumerate(pairs) if j != i]
        held_out.append(pair.at(_best_damping(others) if others else chosen))
    per = [_ratio(e, p.tt) for e, p in zip(held_out, pairs)]
    finite = [e for e in per if math.isfinite(e)]
    band = (min(finite), max(finite)) if finite else (math.inf, math.inf)
    return DampedScore(undamped, _ratio(sum(held_out), tt), chosen, band, per)
