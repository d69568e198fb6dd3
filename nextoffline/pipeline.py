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
from nextoffline.loader import DEFAULT_CHUNK_BYTES, ChunkPlan, iter_chunks, open_readers, plan_chunks
from nextoffline.ops.chunk import FactorChunk, rank1_features
from nextoffline.ops.decompose import frobenius_sq
from nextoffline.ops.predictors import (
    NextOptions,
    Predictor,
    PredictorOptions,
    auto_candidates,
    gram_cache_bytes,
    make_predictor,
    shared_trajectory_gram,
    trajectory_energy,
)
from nextoffline.ops.refactor import refactor_grow_rank, refactor_keep_rank
from nextoffline.types import Trajectory

__all__ = [
    "BacktestResult",
    "Candidate",
    "Extrapolation",
    "NextOptions",
    "PredictorOptions",
    "RunSettings",
    "Target",
    "backtest",
    "build_candidates",
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


def make_predictors(methods: Iterable[str], settings: RunSettings, horizon: int) -> dict[str, Predictor]:
    """A fresh predictor per method name, with the settings' options."""
    return {m: make_predictor(m, horizon=horizon, next_options=settings.predictors.next) for m in methods}


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
    """Future-update error per predictor: ``|dW_pred - dW_true| / |dW_true - dW_last_observed|``."""

    holdout: int
    observed_steps: list[int]
    heldout_steps: list[int]
    errors: dict[str, float]
    per_step: dict[str, list[float]]
    failures: dict[str, str]

    def best(self, max_error: float = AUTO_MAX_ERROR) -> tuple[str | None, float]:
        """The predictor with the lowest error, or ``(None, 1.0)`` when none clearly beats stopping."""
        if not self.errors:
            return None, 1.0
        name = min(self.errors, key=self.errors.__getitem__)
        return (name, self.errors[name]) if self.errors[name] < max_error else (None, 1.0)

    def to_json(self) -> dict[str, Any]:
        name, error = self.best()
        return {
            "holdout": self.holdout,
            "observed_steps": self.observed_steps,
            "heldout_steps": self.heldout_steps,
            "errors": self.errors,
            "per_step_errors": self.per_step,
            "failures": self.failures,
            "best": name,
            "best_error": error,
        }


class _HoldoutErrors:
    """``|D - (dW_t - dW_p)|_F^2`` of predicted updates ``D`` for the held-out steps ``t`` of one
    chunk (``p`` = the last observed step), summed over its modules; ``base`` holds
    ``|dW_t - dW_p|_F^2`` (the error of stopping at ``p``).

    An update that is a weighted sum of the chunk's step updates (RELEX-style predictors) is
    scored with the trajectory Gram ``<dW_i, dW_j>`` of the whole chunk (shared with the predictors):
    a quadratic form, no pass over the factors. Others are scored through the Grams of the
    stacked difference.
    """

    def __init__(self, chunk: FactorChunk, prefix: list[int], trajectory_gram: torch.Tensor | None = None) -> None:
        self.chunk, self.last = chunk, prefix[-1]
        self.held_out = list(range(prefix[-1] + 1, chunk.num_steps))
        self._truth: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: ``(N, K, K)`` float64 ``<dW_i, dW_j>`` over every step of the chunk, when computed
        self.trajectory_gram = trajectory_gram

    @property
    def base(self) -> torch.Tensor:
        return torch.stack([frobenius_sq(*self._true_delta(t)).sum().cpu() for t in self.held_out])

    def of(self, predictor: Predictor, observed: FactorChunk) -> torch.Tensor:
        """Per held-out step, the squared error of ``predictor`` (which observed ``observed``)."""
        out = torch.zeros(len(self.held_out), dtype=torch.float64)
        for j, t in enumerate(self.held_out):
            update = predictor.predict_update(observed, float(self.chunk.steps[t]))
            combination = update.step_combination()
            if combination is not None and self.trajectory_gram is not None:
                out[j] = self._quadratic(combination, t).sum().cpu()
            else:
                true_left, true_right = self._true_delta(t)
                left = torch.cat([update.left, -true_left], dim=-1)
                right = torch.cat([update.right, true_right], dim=-2)
                out[j] = frobenius_sq(left, right).sum().cpu()
        return out

    def _true_delta(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t not in self._truth:
            self._truth[t] = self.chunk.delta(t, self.last)
        return self._truth[t]

    def _quadratic(self, combination: tuple[tuple[int, ...], torch.Tensor], t: int) -> torch.Tensor:
        gram = self.trajectory_gram
        assert gram is not None
        steps, weights = combination
        coef = torch.zeros(weights.shape[0], self.chunk.num_steps, dtype=torch.float64, device=gram.device)
        coef[:, list(steps)] = weights.to(coef)
        coef[:, t] -= 1
        coef[:, self.last] += 1
        return torch.einsum("ni,nij,nj->n", coef, gram, coef).clamp_min(0)


#: Shared float64 trajectory Grams are kept up to the chunk budget, and at least this much.
GRAM_CACHE_MIN_BYTES = 256 * 2**20


def backtest(trajectory: Trajectory, methods: Sequence[str], settings: RunSettings, *, holdout: int = 2) -> BacktestResult:
    """Fit every method on a prefix and score its predictions of the held-out tail.

    Raises:
        NotEnoughCheckpointsError: fewer than 3 checkpoints would remain to fit on.
    """
    k = len(trajectory.steps)
    if holdout < 1 or k - holdout < 3:
        raise NotEnoughCheckpointsError(
            f"{trajectory.source_label}: backtest with --holdout {holdout} leaves {k - holdout} of {k} checkpoints to fit on; "
            "at least 3 are needed: lower --holdout, or (extrapolate) pick a predictor with --method to skip the backtest"
        )
    prefix = list(range(k - holdout))
    predictors = make_predictors(methods, settings, settings.horizon_for(len(prefix)))
    failures: dict[str, str] = {}
    err = {name: torch.zeros(holdout, dtype=torch.float64) for name in predictors}
    base = torch.zeros(holdout, dtype=torch.float64)
    # pass 1: every predictor observes the prefix; per-chunk predictors are scored right away
    for _plan, chunk in stream_chunks(trajectory, settings, "backtest"):
        gram = None
        if any(p.fits_per_chunk for p in predictors.values()) and gram_cache_bytes(chunk) <= max(
            settings.chunk_bytes, GRAM_CACHE_MIN_BYTES
        ):
            gram = shared_trajectory_gram(chunk)  # one computation serves every window and the scores
        holdout_errors = _HoldoutErrors(chunk, prefix, gram)
        base += holdout_errors.base
        observed = chunk.select_steps(prefix)
        for name in list(predictors):
            if not observe(predictors, name, observed, failures):
                continue
            if predictors[name].fits_per_chunk:
                err[name] += holdout_errors.of(predictors[name], observed)
    group_level = {name: p for name, p in predictors.items() if not p.fits_per_chunk}
    fit_all(group_level, settings)
    if group_level:  # pass 2: predictors fitted on every chunk at once
        for _plan, chunk in stream_chunks(trajectory, settings, "backtest"):
            holdout_errors = _HoldoutErrors(chunk, prefix)
            observed = chunk.select_steps(prefix)
            for name, predictor in group_level.items():
                err[name] += holdout_errors.of(predictor, observed)
    err = {name: e for name, e in err.items() if name in predictors}
    errors = {name: _safe_sqrt_ratio(e.sum(), base.sum()) for name, e in err.items()}
    per_step = {name: [_safe_sqrt_ratio(e[j], base[j]) for j in range(holdout)] for name, e in err.items()}
    steps = trajectory.step_numbers
    return BacktestResult(holdout, steps[: k - holdout], steps[k - holdout :], errors, per_step, failures)


def _safe_sqrt_ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return math.sqrt(max(float(num), 0.0) / float(den)) if float(den) > 0 else (1.0 if float(num) == 0 else math.inf)


def fit_predictors(
    trajectory: Trajectory, methods: Sequence[str], settings: RunSettings, step_index: list[int], horizon: int
) -> tuple[dict[str, Predictor], dict[str, str]]:
    """Pass 1: stream the observed steps through every predictor, then fit them."""
    predictors = make_predictors(methods, settings, horizon)
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
) -> Extrapolation:
    """Fit a predictor (``auto`` = best backtest) and build one adapter per target, in memory."""
    if rank_policy not in ("keep", "grow"):
        raise UsageError(f"--rank-policy {rank_policy!r}: use keep or grow")
    k = len(trajectory.steps)
    horizon = settings.horizon_for(k)
    targets = resolve_targets(trajectory, horizon=horizon, coefs=coefs, to_steps=to_steps)
    report, note = None, ""
    if method == "auto":
        report = backtest(trajectory, auto_candidates(k - holdout), settings, holdout=holdout)
        best, error = report.best()
        if best is None:
            note = (
                f"no predictor beat stopping at the last checkpoint in the backtest (best error >= {AUTO_MAX_ERROR}): "
                "the latest weights are kept unchanged"
            )
            LOG.warning(note)
            return _unchanged(trajectory, targets, horizon, rank_policy, report, note, settings)
        method = best
        note = f"auto selected {best} (backtest error {error:.3f} vs 1.0 for stopping)"
    predictor = make_predictors([method], settings, horizon)[method]
    if predictor.fits_per_chunk:
        candidates = build_candidates(trajectory, predictor, targets, rank_policy, settings, observe=True)
    else:
        predictors, failures = fit_predictors(trajectory, [method], settings, list(range(k)), horizon)
        if method in failures:
            raise NotEnoughCheckpointsError(failures[method])
        predictor = predictors[method]
        candidates = build_candidates(trajectory, predictor, targets, rank_policy, settings)
    return Extrapolation(method, predictor.settings(), horizon, horizon_steps(trajectory, horizon), rank_policy, candidates, report, note)


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
