"""Orchestration: trajectory -> chunks -> predictors -> factors. No math, no argument parsing.

Every public function works in memory and returns plain results; :mod:`nextoffline.output`
persists them. The CLI, the report and the Python API all stream the trajectory through
:func:`stream_chunks` and feed predictors with :func:`observe`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from nextoffline.errors import NotEnoughCheckpointsError, NumericalError, UsageError
from nextoffline.forecasting import ForecastOptions, PairScores, TargetForecast, available_axes, next_fit_groups, plan_targets, score_pairs
from nextoffline.loader import DEFAULT_CHUNK_BYTES, ChunkPlan, iter_chunks, open_readers, plan_chunks
from nextoffline.ops.chunk import FactorChunk, rank1_features
from nextoffline.ops.decompose import frobenius_sq
from nextoffline.ops.forecast import TimeAxis
from nextoffline.ops.predictors import (
    DENOISERS,
    NextOptions,
    Predictor,
    PredictorOptions,
    auto_candidates,
    gram_cache_bytes,
    make_predictor,
    parse_predictor_name,
    shared_trajectory_gram,
    trajectory_energy,
)
from nextoffline.ops.predictors.next import projected_fit_seconds
from nextoffline.ops.predictors.wrappers import DampedPredictor
from nextoffline.ops.refactor import refactor_grow_rank, refactor_keep_rank
from nextoffline.types import Trajectory

__all__ = [
    "BacktestResult",
    "Candidate",
    "Extrapolation",
    "ForecastOptions",
    "NextOptions",
    "PredictorOptions",
    "RunSettings",
    "Target",
    "backtest",
    "build_candidates",
    "check_holdout",
    "default_horizon",
    "extrapolate",
    "fit_all",
    "fit_predictors",
    "horizon_steps",
    "inspect_trajectory",
    "make_predictors",
    "observe",
    "resolve_targets",
    "stream_chunks",
]

LOG = logging.getLogger(__name__)

#: ``auto`` only moves the weights when the best backtest error is below this (1.0 = stopping);
#: smaller gains are within the noise of a two-checkpoint backtest.
AUTO_MAX_ERROR = 0.95


@dataclass(frozen=True)
class RunSettings:
    """The compute policy of every phase, and the predictors' options.

    Attributes:
        device: compute device.
        chunk_bytes: memory budget of one module batch (float32 factors over all steps).
        progress: show progress bars.
        predictors: predictor hyperparameters (horizon, NExt training).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: bool = True
    predictors: PredictorOptions = field(default_factory=PredictorOptions)

    def horizon_for(self, num_steps: int) -> int:
        """The horizon in checkpoints for a trajectory (or prefix) of ``num_steps`` checkpoints."""
        return self.predictors.horizon or default_horizon(num_steps)


def default_horizon(num_steps: int) -> int:
    """NExt's horizon in checkpoints: 5 (50 steps at 10 per checkpoint), fewer on short runs."""
    return max(1, min(5, (num_steps - 2) // 2))


def horizon_steps(trajectory: Trajectory, horizon: int) -> float:
    """Training steps spanned by ``horizon`` checkpoints (mean spacing times ``horizon``)."""
    steps = trajectory.step_numbers
    return (steps[-1] - steps[0]) / (len(steps) - 1) * horizon


def stream_chunks(
    trajectory: Trajectory, settings: RunSettings, desc: str, *, reuse: bool = True, modules: Collection[str] | None = None
) -> Iterator[tuple[ChunkPlan, FactorChunk]]:
    """Yield every chunk of the trajectory over all its steps (one read of the files); with
    ``modules``, only the chunks holding one of them.

    With ``reuse`` (default) each chunk's factor tensors live in memory that the next chunk
    overwrites (filling fresh memory for every chunk cost 5.7 s instead of 2.4 s per pass over
    the 7B-shaped benchmark): consumers and predictors keep computed results, never views.
    """
    plans = plan_chunks(trajectory, budget_bytes=settings.chunk_bytes)
    total = sum(1 for p in plans if modules is None or any(name in modules for name in p.names))
    with tqdm(total=total, desc=desc, unit="group", disable=not settings.progress, leave=False) as bar:
        chunks = iter_chunks(trajectory, settings.device, budget_bytes=settings.chunk_bytes, reuse=reuse, modules=modules)
        for plan, chunk in chunks:
            yield plan, chunk
            bar.update(1)


def make_predictors(
    methods: Iterable[str], settings: RunSettings, horizon: int, *, axes: dict[str, TimeAxis] | None = None
) -> dict[str, Predictor]:
    """A fresh predictor per method name, with the settings' options (``axes``: the run's time axes
    for ``NAME:AXIS`` methods)."""
    return {m: make_predictor(m, horizon=horizon, next_options=settings.predictors.next, axes=axes) for m in methods}


def observe(predictors: dict[str, Predictor], name: str, chunk: FactorChunk, failures: dict[str, str]) -> bool:
    """``predictors[name].observe(chunk)``; a predictor that cannot use the steps is dropped
    (its reason kept in ``failures``)."""
    try:
        predictors[name].observe(chunk)
    except NotEnoughCheckpointsError as exc:
        failures[name] = str(exc)
        del predictors[name]
        return False
    return True


def fit_all(predictors: dict[str, Predictor], settings: RunSettings) -> None:
    """Fit every predictor that learns across chunks (after they observed every chunk)."""
    for name in tqdm(list(predictors), desc="fit", unit="group", disable=not settings.progress, leave=False):
        predictors[name].fit()


# ---------------------------------------------------------------------------------------- inspect


def inspect_trajectory(trajectory: Trajectory, settings: RunSettings) -> dict[str, Any]:
    """Layout, steps, modules and rank-1 dominance of a trajectory, as stable JSON-able keys."""
    k = len(trajectory.steps)
    global_top, global_total = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    local_top, local_total = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    explained_num, explained_den = 0.0, 0.0
    for _plan, chunk in stream_chunks(trajectory, settings, "inspect"):
        features = rank1_features(chunk, horizon=k)  # global and local deltas from shared Gram blocks
        for t in range(k):
            global_top[t] += features.global_[t].sigma.double().square().sum().cpu()
            global_total[t] += features.global_energy[t].sum().cpu()
            if t:
                local_top[t] += features.local[t].sigma.double().square().sum().cpu()
                local_total[t] += features.local_energy[t].sum().cpu()
        explained, energy = trajectory_energy(chunk)  # weighted by |dW_latest|^2
        explained_num += float((explained.cpu() * energy.cpu()).sum())
        explained_den += float(energy.sum())
    return {
        "source": trajectory.source_label,
        "format": trajectory.format_name,
        "steps": trajectory.step_numbers,
        "num_modules": len(trajectory.modules),
        "groups": [
            {"out_features": m, "in_features": n, "rank": r, "modules": len(mods)} for (m, n, r), mods in trajectory.groups().items()
        ],
        "rank": trajectory.adapter_config.get("r"),
        "lora_alpha": trajectory.adapter_config.get("lora_alpha"),
        "use_rslora": bool(trajectory.adapter_config.get("use_rslora", False)),
        "dtypes": sorted(set(trajectory.dtypes.values())),
        "target_modules": trajectory.adapter_config.get("target_modules"),
        "passthrough_tensors": len(trajectory.passthrough_keys),
        "per_step": [
            {
                "step": step,
                "global_rank1_energy": _ratio(global_top[i], global_total[i]),
                "local_rank1_energy": _ratio(local_top[i], local_total[i]) if i else None,
                "global_norm": math.sqrt(float(global_total[i])) / (trajectory.factor_scale[0] * trajectory.factor_scale[1]),
            }
            for i, step in enumerate(trajectory.step_numbers)
        ],
        "trajectory_explained_variance": explained_num / explained_den if explained_den > 0 else 1.0,
    }


def _ratio(top: torch.Tensor, total: torch.Tensor) -> float:
    return float(top / total) if float(total) > 0 else 1.0


# --------------------------------------------------------------------------------------- backtest


@dataclass
class BacktestResult:
    """Future-update error per predictor: ``|dW_pred - dW_true| / |dW_true - dW_last_observed|``.

    ``errors``/``per_step`` score one fit on all but the last ``holdout`` checkpoints against
    them; ``targets`` score rolling origins at each requested target's lead, with damping and
    an error band (see :mod:`nextoffline.forecasting`).
    """

    holdout: int
    observed_steps: list[int]
    heldout_steps: list[int]
    errors: dict[str, float]
    per_step: dict[str, list[float]]
    failures: dict[str, str]
    targets: list[TargetForecast] = field(default_factory=list)
    time_axes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def best(self, max_error: float = AUTO_MAX_ERROR) -> tuple[str | None, float]:
        """The predictor with the lowest error, or ``(None, 1.0)`` when none clearly beats stopping
        (checkpoint averages are baselines and never selected).

        With targets: the lowest mean damped rolling-origin error over the targets; else the
        lowest holdout error.
        """
        means = self.target_means()
        pool = {n: e for n, e in (means if means else self.errors).items() if parse_predictor_name(n)[0] not in DENOISERS}
        if not pool:
            return None, 1.0
        name = min(pool, key=pool.__getitem__)
        return (name, pool[name]) if pool[name] < max_error else (None, 1.0)

    def target_means(self) -> dict[str, float]:
        """Mean damped error over the targets that have a lead, for candidates scored at all of them."""
        scored = [t for t in self.targets if t.lead > 0]
        if not scored:
            return {}
        names = set.intersection(*(set(t.scores) for t in scored))
        return {name: sum(t.scores[name].damped_error for t in scored) / len(scored) for name in sorted(names)}

    def to_json(self) -> dict[str, Any]:
        name, error = self.best()
        return {
            "holdout": self.holdout,
            "observed_steps": self.observed_steps,
            "heldout_steps": self.heldout_steps,
            "errors": self.errors,
            "per_step_errors": self.per_step,
            "failures": self.failures,
            "targets": [t.to_json() for t in self.targets],
            "time_axes": self.time_axes,
            "notes": self.notes,
            "best": name,
            "best_error": error,
        }


#: Shared float64 trajectory Grams are kept up to the chunk budget, and at least this much.
GRAM_CACHE_MIN_BYTES = 256 * 2**20


def check_holdout(source_label: str, num_steps: int, holdout: int) -> None:
    """Refuse a backtest that leaves fewer than 3 of ``num_steps`` checkpoints to fit on.

    Raises:
        NotEnoughCheckpointsError: names the source and the fix.
    """
    if holdout < 1 or num_steps - holdout < 3:
        raise NotEnoughCheckpointsError(
            f"{source_label}: backtest with --holdout {holdout} leaves {num_steps - holdout} of {num_steps} checkpoints to fit on; "
            "at least 3 are needed: lower --holdout, or (extrapolate) pick a predictor with --method to skip the backtest"
        )


def backtest(
    trajectory: Trajectory,
    methods: Sequence[str],
    settings: RunSettings,
    *,
    holdout: int = 2,
    targets: Sequence[float] = (),
    forecast: ForecastOptions | None = None,
    budget_next: bool = False,
) -> BacktestResult:
    """Fit every method on prefixes and score its predictions of later checkpoints.

    Always: one fit on all but the last ``holdout`` checkpoints, scored on them. For each step
    in ``targets``: rolling origins at that target's lead (``forecast`` says how many, and
    whether damping is chosen). With ``budget_next``, NExt is skipped (with the reason in
    ``notes``) when its projected training time exceeds ``forecast.next_budget_s``.

    Raises:
        NotEnoughCheckpointsError: fewer than 3 checkpoints would remain to fit on.
    """
    k = len(trajectory.steps)
    check_holdout(trajectory.source_label, k, holdout)
    options = forecast or ForecastOptions()
    axes, missing = available_axes(trajectory, options)
    steps = trajectory.step_numbers
    notes = [f"time axis {axis} not available: {why}" for axis, why in missing.items() if axis in options.time_axes]
    methods = [m for m in dict.fromkeys(methods) if parse_predictor_name(m)[2] in axes]
    plans = plan_targets(steps, targets, options)
    pairs: dict[int, set[int]] = {k - holdout - 1: set(range(k - holdout, k))}
    for plan in plans:
        for o in plan.origins:
            pairs.setdefault(o, set()).add(o + plan.scored_lead)
        if plan.lead > plan.scored_lead:
            notes.append(
                f"target step {plan.target_step:g} is {plan.lead} checkpoints ahead; the run allows scoring {plan.scored_lead} "
                "(from its earliest origin)"
            )
    # trained predictors (NExt) are costly per fit: scored at the latest origin of each lead only
    trained = [m for m in methods if parse_predictor_name(m)[0] == "next"]
    trained_pairs: dict[int, set[int]] = {k - holdout - 1: set(range(k - holdout, k))}
    for plan in plans:
        if plan.origins:
            trained_pairs.setdefault(plan.origins[-1], set()).add(plan.origins[-1] + plan.scored_lead)
    if budget_next and trained:
        methods, note = _within_next_budget(trajectory, methods, settings, options, sorted(trained_pairs))
        notes += [note] if note else []
        trained = [m for m in trained if m in methods]
    scores = None
    for group, group_pairs in (([m for m in methods if m not in trained], pairs), (trained, trained_pairs)):
        if not group:
            continue
        part = score_pairs(
            trajectory,
            group,
            group_pairs,
            chunks=lambda desc: (chunk for _plan, chunk in stream_chunks(trajectory, settings, desc)),
            trajectory_gram=lambda chunk, needed: _trajectory_gram(chunk, settings) if needed else None,
            horizon=settings.predictors.horizon,
            next_options=settings.predictors.next,
            axes=axes,
            progress=lambda items, desc: tqdm(items, desc=desc, unit="group", disable=not settings.progress, leave=False),
        )
        scores = part if scores is None else scores.merged(part)
    if scores is None:
        scores = PairScores({}, {})
    legacy = [(k - holdout - 1, t) for t in range(k - holdout, k)]
    errors, per_step = {}, {}
    for name in methods:
        have = scores.sums.get(name, {})
        if name in scores.failures and not all(p in have for p in legacy):
            continue
        pair_sums = [have[p] for p in legacy]
        errors[name] = _ratio_of(sum(p.error for p in pair_sums), sum(p.tt for p in pair_sums))
        per_step[name] = [_ratio_of(p.error, p.tt) for p in pair_sums]
    for plan in plans:
        pairs_at = [(o, o + plan.scored_lead) for o in plan.origins]
        for name in methods:
            score = scores.score(name, pairs_at[-1:] if name in trained else pairs_at, damping=options.damping)
            if score is not None and plan.lead > 0:
                plan.scores[name] = score
    failures = {name: why for name, why in scores.failures.items() if name not in errors}
    axis_names = {kind: axis.describe() for kind, axis in axes.items()}
    return BacktestResult(holdout, steps[: k - holdout], steps[k - holdout :], errors, per_step, failures, plans, axis_names, notes)


def _trajectory_gram(chunk: FactorChunk, settings: RunSettings) -> torch.Tensor | None:
    """The chunk's float64 trajectory Gram (one computation serves every window and score), or
    ``None`` when its memo would exceed the budget."""
    if gram_cache_bytes(chunk) > max(settings.chunk_bytes, GRAM_CACHE_MIN_BYTES):
        return None
    return shared_trajectory_gram(chunk)


def _within_next_budget(
    trajectory: Trajectory, methods: list[str], settings: RunSettings, options: ForecastOptions, origins: list[int]
) -> tuple[list[str], str]:
    """Drop NExt (with the reason) when its projected training time exceeds the budget."""
    epochs, hidden = settings.predictors.next.epochs, settings.predictors.next.hidden
    k = len(trajectory.steps)
    fits = [o + 1 for o in origins] + [k]  # every backtest origin and the final fit
    seconds = sum(
        projected_fit_seconds(next_fit_groups(trajectory, n, settings.horizon_for(n)), epochs=epochs, hidden=hidden, device=settings.device)
        for n in fits
    )
    if seconds <= options.next_budget_s:
        return methods, ""
    note = (
        f"auto skipped next: its {len(fits)} fits ({epochs} epochs each) are projected to take ~{_duration(seconds)} on "
        f"{settings.device}, over the {options.next_budget_s:g} s budget (--next-budget); --method next runs the reference fit"
    )
    LOG.warning(note)
    return [m for m in methods if m != "next"], note


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else (f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s")


def _ratio_of(num: float, den: float) -> float:
    return math.sqrt(max(num, 0.0) / den) if den > 0 else (1.0 if num <= 0 else math.inf)


def fit_predictors(
    trajectory: Trajectory, methods: Sequence[str], settings: RunSettings, step_index: list[int], horizon: int
) -> tuple[dict[str, Predictor], dict[str, str]]:
    """Pass 1: stream the observed steps through every predictor, then fit them."""
    axes, _missing = available_axes(trajectory, ForecastOptions())
    predictors = make_predictors(methods, settings, horizon, axes=axes)
    failures: dict[str, str] = {}
    for _plan, chunk in stream_chunks(trajectory, settings, "decompose"):
        observed = chunk.select_steps(step_index)
        for name in list(predictors):
            observe(predictors, name, observed, failures)
    fit_all(predictors, settings)
    return predictors, failures


# ------------------------------------------------------------------------------------ extrapolate


@dataclass
class Candidate:
    """One extrapolated adapter, in memory."""

    target_step: float
    coef: float
    tensors: dict[str, torch.Tensor]
    kept_energy_mean: float
    kept_energy_min: float
    relative_update: float
    gauge_resets: int
    by_step: bool = False  # requested by target step (``--to-step``), not by coefficient


@dataclass
class Extrapolation:
    """Everything ``extrapolate`` decided and produced."""

    method: str
    predictor_settings: dict[str, Any]
    horizon: int
    horizon_steps: float
    rank_policy: str
    candidates: list[Candidate]
    backtest: BacktestResult | None
    note: str = ""
    #: per target (``auto``): lead, damping, backtest errors and band of the selected predictor
    forecast: list[dict[str, Any]] = field(default_factory=list)


class Target(NamedTuple):
    """One requested candidate: a step, its coefficient, and whether it was asked for by step."""

    step: float
    coef: float
    by_step: bool = False


def resolve_targets(trajectory: Trajectory, *, horizon: int, coefs: Sequence[float] = (), to_steps: Sequence[float] = ()) -> list[Target]:
    """Targets from ``--coef`` and/or ``--to-step`` values, coefficients first.

    A coefficient ``c`` stands for the step ``t_last + c * horizon_steps``.
    """
    last = trajectory.step_numbers[-1]
    span = horizon_steps(trajectory, horizon)
    pairs = []
    for coef in coefs:
        if not math.isfinite(coef) or coef < 0:
            raise UsageError(f"--coef {coef}: coefficients must be finite and >= 0 (0 = the latest checkpoint)")
        pairs.append(Target(last + coef * span, float(coef)))
    for step in to_steps:
        if not math.isfinite(step) or step <= last:
            raise UsageError(f"--to-step {step:g}: the target must be after the last checkpoint (step {last})")
        pairs.append(Target(float(step), (step - last) / span, by_step=True))
    if not pairs:
        raise UsageError("give --to-step N or --coef C (comma lists allowed)")
    return pairs


def extrapolate(
    trajectory: Trajectory,
    settings: RunSettings,
    *,
    method: str = "auto",
    coefs: Sequence[float] = (),
    to_steps: Sequence[float] = (),
    rank_policy: str = "keep",
    holdout: int = 2,
    forecast: ForecastOptions | None = None,
) -> Extrapolation:
    """Fit a predictor and build one adapter per target, in memory.

    ``auto`` backtests every candidate with rolling origins at each target's lead, keeps the one
    with the lowest mean damped error (none, and the latest weights, when it does not beat
    stopping by :data:`AUTO_MAX_ERROR`) and damps each target by the factor chosen on those
    backtests (``0``: that target keeps the latest weights exactly).
    """
    if rank_policy not in ("keep", "grow"):
        raise UsageError(f"--rank-policy {rank_policy!r}: use keep or grow")
    k = len(trajectory.steps)
    horizon = settings.horizon_for(k)
    targets = resolve_targets(trajectory, horizon=horizon, coefs=coefs, to_steps=to_steps)
    options = forecast or ForecastOptions()
    report, note, plan = None, "", []
    dampings = {t.step: 1.0 for t in targets}
    if method == "auto":
        candidates = auto_candidates(k - holdout, axes=options.time_axes)
        report = backtest(
            trajectory, candidates, settings, holdout=holdout, targets=[t.step for t in targets], forecast=options, budget_next=True
        )
        best, error = report.best()
        if best is None:
            note = (
                f"no predictor beat stopping at the last checkpoint in the backtest (best error >= {AUTO_MAX_ERROR}): "
                "the latest weights are kept unchanged"
            )
            LOG.warning(note)
            return _unchanged(trajectory, targets, horizon, rank_policy, report, note, settings)
        method = best
        dampings, plan = _dampings(report, best, targets, options)
        note = f"auto selected {best} (mean damped backtest error {error:.3f} over the targets' leads vs 1.0 for stopping)"
    predictor = make_predictors([method], settings, horizon, axes=available_axes(trajectory, options)[0])[method]
    if predictor.fits_per_chunk:
        candidates = build_candidates(trajectory, DampedPredictor(predictor, dampings), targets, rank_policy, settings, observe=True)
    else:
        predictors, failures = fit_predictors(trajectory, [method], settings, list(range(k)), horizon)
        if method in failures:
            raise NotEnoughCheckpointsError(failures[method])
        predictor = predictors[method]
        candidates = build_candidates(trajectory, DampedPredictor(predictor, dampings), targets, rank_policy, settings)
    if any(a == 0.0 for a in dampings.values()):  # stopping is exact: the latest tensors themselves
        latest = _latest_tensors(trajectory)
        candidates = [
            c if dampings[c.target_step] != 0.0 else Candidate(c.target_step, c.coef, dict(latest), 1.0, 1.0, 0.0, 0, c.by_step)
            for c in candidates
        ]
    settings_record = predictor.settings()
    return Extrapolation(
        method, settings_record, horizon, horizon_steps(trajectory, horizon), rank_policy, candidates, report, note, forecast=plan
    )


def _dampings(
    report: BacktestResult, best: str, targets: list[Target], options: ForecastOptions
) -> tuple[dict[float, float], list[dict[str, Any]]]:
    """Per target: the damping of ``best`` chosen on its rolling origins (0 where even damped it
    does not beat stopping, or the target is the latest step), and what the backtest said."""
    by_step = {plan.target_step: plan for plan in report.targets}
    dampings, records = {}, []
    for step, coef, _by_step in targets:
        plan = by_step.get(step)
        score = plan.scores.get(best) if plan is not None else None
        if plan is None or plan.lead == 0 or score is None:
            dampings[step] = 0.0 if plan is not None and plan.lead == 0 else 1.0
            continue
        damping = score.damping if options.damping else 1.0
        if score.damped_error >= AUTO_MAX_ERROR:
            damping = 0.0
        dampings[step] = damping
        records.append(
            {
                "step": step,
                "coef": coef,
                "lead_checkpoints": plan.lead,
                "scored_lead_checkpoints": plan.scored_lead,
                "origin_steps": plan.origin_steps,
                "predictor": best,
                "error": score.error,
                "damped_error": score.damped_error,
                "damping": damping,
                "band": list(score.band),
            }
        )
    return dampings, records


def _unchanged(trajectory, targets, horizon, rank_policy, report, note, settings) -> Extrapolation:
    """Candidates equal to the latest adapter (what ``auto`` returns when nothing helps)."""
    tensors = _latest_tensors(trajectory)
    candidates = [Candidate(t.step, t.coef, dict(tensors), 1.0, 1.0, 0.0, 0, t.by_step) for t in targets]
    return Extrapolation("none", {"predictor": "none"}, horizon, horizon_steps(trajectory, horizon), rank_policy, candidates, report, note)


def _latest_tensors(trajectory: Trajectory, *, passthrough_only: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of the latest checkpoint (only those that are not LoRA factors with ``passthrough_only``)."""
    with open_readers(trajectory) as readers:
        latest = readers[-1]
        keys = trajectory.passthrough_keys if passthrough_only else latest.keys()
        tensors = {key: latest.get(key).clone() for key in keys}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NumericalError(f"{latest.path}: tensor {key} holds NaN or Inf; use an earlier checkpoint or drop this step")
    return tensors


def build_candidates(
    trajectory: Trajectory,
    predictor: Predictor,
    targets: list[Target],
    rank_policy: str,
    settings: RunSettings,
    *,
    observe: bool = False,
) -> list[Candidate]:
    """Pass 2: predict, re-factor and cast every module for every target.

    With ``observe`` (predictors that fit each chunk on its own) this is the only pass: each
    chunk is observed, then predicted while its factors and Gram matrices are still at hand.
    """
    latest = _latest_tensors(trajectory, passthrough_only=True)  # the factors are all re-written below
    outputs = [dict(latest) for _ in targets]
    stats = [{"kept": [], "weights": [], "update": 0.0, "base": 0.0, "resets": 0} for _ in targets]
    refactor = refactor_keep_rank if rank_policy == "keep" else refactor_grow_rank
    for plan, chunk in stream_chunks(trajectory, settings, "extrapolate"):
        if observe:
            predictor.observe(chunk)
        b_last, a_last = chunk.b[-1], chunk.a[-1]
        base_sq = frobenius_sq(*chunk.update(chunk.num_steps - 1)).cpu()
        for target, out, stat in zip(targets, outputs, stats):
            update = predictor.predict_update(chunk, target.step)
            result = refactor(b_last, a_last, chunk.scaling, update)
            _store(plan.modules, result.b, result.a, out, trajectory)
            stat["kept"].append(result.kept_energy.cpu())
            stat["weights"].append(update.frobenius_sq().cpu())
            stat["update"] += float(stat["weights"][-1].sum())
            stat["base"] += float(base_sq.sum())
            stat["resets"] += int(result.gauge_reset.sum())
    return [_candidate(target, out, stat) for target, out, stat in zip(targets, outputs, stats)]


def _store(modules, b: torch.Tensor, a: torch.Tensor, out: dict[str, torch.Tensor], trajectory: Trajectory) -> None:
    """Cast new factors to each key's source dtype, on CPU, and check they are finite."""
    scale_b, scale_a = trajectory.factor_scale
    for i, module in enumerate(modules):
        for key, value, scale in ((module.b_key, b[i], scale_b), (module.a_key, a[i], scale_a)):
            value = value if scale == 1.0 else value / scale  # undo the exact power-of-two compute scaling
            value = value.to(device="cpu", dtype=getattr(torch, trajectory.dtypes[key])).contiguous()
            if not torch.isfinite(value).all():  # after the cast: float16 overflows at 65504
                raise NumericalError(
                    f"{module.name}: the extrapolated factors are not finite in {trajectory.dtypes[key]}; "
                    "lower the coefficient or use another --method"
                )
            out[key] = value


def _candidate(target: Target, tensors: dict[str, torch.Tensor], stat: dict[str, Any]) -> Candidate:
    kept, weights = torch.cat(stat["kept"]), torch.cat(stat["weights"]).double()
    weighted = float((kept * weights).sum() / weights.sum()) if float(weights.sum()) > 0 else 1.0
    relative = math.sqrt(stat["update"] / stat["base"]) if stat["base"] > 0 else 0.0
    return Candidate(target.step, target.coef, tensors, weighted, float(kept.min()), relative, stat["resets"], target.by_step)
