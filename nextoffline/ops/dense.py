"""Pure math of full-parameter (dense) trajectories: temporal Grams, trends, top triplets.

A full-parameter trajectory holds, per tensor, the weights ``W_1 .. W_K`` at the saved steps.
Global deltas are ``g_t = W_t - W_ref`` (``W_ref``: the base model, or the earliest
checkpoint). Everything the RELEX-style predictors need is the ``K x K`` temporal Gram
``G_ij = <g_i, g_j>`` of each tensor: it is additive over slices of the flattened tensor, so
it is accumulated slab by slab (memory bounded by the slab, not the tensor or ``K``), and the
prediction ``W_last + sum_i w_i g_i`` is elementwise, so it is written slab by slab too.

Determinism (one process or many, any slab placement): Grams are accumulated in float64 by
single-threaded GEMMs over the same slabs in the same order, and every fit runs on the same
batch of Grams; the write is elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nextoffline.ops.chunk import Rank1Features, aligned_features
from nextoffline.ops.decompose import Triplets
from nextoffline.ops.device import single_thread
from nextoffline.ops.predictors.trajectory import rank1_from_gram
from nextoffline.ops.regressors import make_regressor

__all__ = [
    "Triplet",
    "TripletSeries",
    "accumulate_gram",
    "align_signs",
    "holdout_errors",
    "top_triplet",
    "trend_curve",
    "trend_weights",
    "truncated_features",
]

_F64 = torch.float64


def accumulate_gram(gram: torch.Tensor, deltas: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """``gram += deltas @ deltas.T`` in float64, reproducibly.

    Args:
        gram: ``(K, K)`` float64 accumulator.
        deltas: ``(K, s)`` slab of flattened global deltas (any float dtype; widened to float64).
        scratch: optional float64 ``(K, s)`` buffer for the widened copy (avoids an allocation).
    """
    if deltas.dtype == _F64:
        wide = deltas
    elif scratch is not None:
        wide = scratch.copy_(deltas)
    else:
        wide = deltas.to(_F64)
    if wide.device.type == "cpu":
        with single_thread():
            gram.add_(wide @ wide.T)
    else:
        gram.add_(wide @ wide.T)


# --------------------------------------------------------------------------- trends over steps


def _fit_trend(gram: torch.Tensor, steps: Sequence[float], observed: Sequence[int], regressor: str, window: int | None):
    """The window's indices, its top trajectory direction and the fitted trend of its coefficient."""
    index = list(observed) if window is None else list(observed)[-window:]
    sub = gram[:, index][:, :, index]
    rank1 = rank1_from_gram(sub)
    x = torch.tensor([float(steps[i]) for i in index], dtype=_F64).unsqueeze(0).expand(gram.shape[0], -1)
    return index, rank1, make_regressor(regressor).fit(x, rank1.coefficients)


def trend_weights(
    gram: torch.Tensor,
    steps: Sequence[float],
    observed: Sequence[int],
    *,
    regressor: str,
    window: int | None,
    target_step: float,
) -> torch.Tensor:
    """Weights ``w`` (``(N, K)`` float64) with ``sum_i w_i g_i`` the predicted update from the last
    observed step to ``target_step`` (RELEX: top trajectory direction, trend of its coefficient).

    Args:
        gram: ``(N, K, K)`` float64 temporal Grams of the global deltas over all ``K`` steps.
        steps: training step of each of the ``K`` indices.
        observed: indices the fit may use (a prefix in backtests, all otherwise), increasing.
        regressor: a name from :mod:`nextoffline.ops.regressors` (linear, power, poly, gp).
        window: use only the last ``window`` observed indices (``None`` = all).
        target_step: step to predict.
    """
    index, rank1, trend = _fit_trend(gram, steps, observed, regressor, window)
    gain = trend.predict(torch.tensor(float(target_step))) - trend.predict(torch.tensor(float(steps[index[-1]])))
    weights = torch.zeros(gram.shape[0], gram.shape[-1], dtype=_F64)
    weights[:, index] = gain.unsqueeze(-1) * rank1.weights
    return weights


def trend_curve(
    gram: torch.Tensor,
    steps: Sequence[float],
    direction: torch.Tensor,
    grid: Sequence[float],
    *,
    regressor: str,
    window: int | None,
) -> torch.Tensor:
    """``<D(t), V>`` for every step ``t`` of ``grid`` (``(N, G)`` float64): the component along the
    direction ``V = sum_i direction_i g_i`` of the update a trend fitted on all steps adds to the
    latest checkpoint to reach ``t`` (one fit, evaluated on the whole grid; Gram arithmetic only).
    """
    index, rank1, trend = _fit_trend(gram, steps, range(gram.shape[-1]), regressor, window)
    weights = torch.zeros(gram.shape[0], gram.shape[-1], dtype=_F64)
    weights[:, index] = rank1.weights
    along = torch.einsum("ni,nij,nj->n", weights, gram, direction.to(_F64))
    last = trend.predict(torch.tensor(float(steps[index[-1]])))
    gains = torch.stack([trend.predict(torch.tensor(float(t))) - last for t in grid], dim=-1)
    return gains * along.unsqueeze(-1)


def holdout_errors(gram: torch.Tensor, weights: torch.Tensor, last: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared errors ``|D - (g_t - g_p)|^2`` of predictions ``D = sum_i w_i g_i`` and of stopping
    ``|g_t - g_p|^2``, per tensor, as quadratic forms of the Gram (``p`` = ``last``, ``t`` = ``target``)."""
    coef = weights.clone()
    coef[:, target] -= 1
    coef[:, last] += 1
    err = torch.einsum("ni,nij,nj->n", coef, gram, coef).clamp_min(0)
    base = (gram[:, target, target] - 2 * gram[:, target, last] + gram[:, last, last]).clamp_min(0)
    return err, base


# ------------------------------------------------------------------------- top singular triplet


@dataclass
class Triplet:
    """Top singular triplet per matrix: ``sigma`` ``(N,)``, ``u`` ``(N, m)``, ``v`` ``(N, n)``."""

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    iterations: int


def top_triplet(
    x: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    block: int = 4,
    tol: float = 1e-6,
    max_iters: int = 300,
    seed: int = 0,
) -> Triplet:
    """Top singular triplet of each matrix of ``x`` (``(N, m, n)``) by batched subspace iteration.

    A block of ``block`` vectors (the extra ones speed up convergence when the top two singular
    values are close) is iterated ``V <- orth(X^T orth(X V))`` until the top singular value
    estimate changes by less than ``tol`` (relative); a Rayleigh-Ritz step on the block then
    gives the triplet. ``init`` (``(N, n)``, e.g. the previous checkpoint's ``v``) warm-starts
    the first vector; the others come from a seeded generator, so results are reproducible.
    """
    n_mat, m, n = x.shape
    q = max(1, min(block, m, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n_mat, n, q, generator=gen, dtype=x.dtype).to(x.device)
    if init is not None:
        v[:, :, 0] = init.to(v)
    v, _ = torch.linalg.qr(v)
    previous = torch.full((n_mat,), -1.0, dtype=x.dtype, device=x.device)
    iters = 0
    for iters in range(1, max_iters + 1):  # noqa: B007 - the count is reported
        u, _ = torch.linalg.qr(x @ v)
        v, r = torch.linalg.qr(x.mT @ u)
        sigma = torch.linalg.svdvals(r)[:, 0]
        if bool(((sigma - previous).abs() <= tol * sigma.clamp_min(torch.finfo(x.dtype).tiny)).all()):
            break
        previous = sigma
    left, s, right_h = torch.linalg.svd(r.mT)  # U^T X V = R^T = P S Q^T
    top_u = (u @ left[:, :, :1]).squeeze(-1)
    top_v = (v @ right_h.mT[:, :, :1]).squeeze(-1)
    return Triplet(sigma=s[:, 0], u=top_u, v=top_v, iterations=iters)


def align_signs(triplet: Triplet, reference_u: torch.Tensor | None = None) -> Triplet:
    """Flip ``(u, v)`` pairs so ``<u, reference_u> >= 0`` (e.g. the previous checkpoint's ``u``),
    or, without a reference, so the largest-magnitude entry of ``u`` is positive."""
    if reference_u is not None:
        score = (triplet.u * reference_u.to(triplet.u)).sum(-1)
    else:
        score = triplet.u.gather(-1, triplet.u.abs().argmax(-1, keepdim=True)).squeeze(-1)
    sign = torch.where(score < 0, -1.0, 1.0).to(triplet.u).unsqueeze(-1)
    return Triplet(sigma=triplet.sigma, u=triplet.u * sign, v=triplet.v * sign, iterations=triplet.iterations)


def safe_ratio(num: float, den: float) -> float:
    """``sqrt(num / den)`` with the conventions of backtest errors (0/0 = 1, x/0 = inf)."""
    if den > 0:
        return math.sqrt(max(num, 0.0) / den)
    return 1.0 if num == 0 else math.inf


# ----------------------------------------------------------------- NExt features of dense deltas


def _triplets(x: torch.Tensor, init: torch.Tensor | None) -> Triplets:
    """Top triplet of each ``(m, n)`` matrix of ``x`` (``(N, m, n)``) as NExt's :class:`~nextoffline.ops.decompose.Triplets`
    (``u = v = 0`` where the matrix is zero), warm-started from ``init`` (``(N, n)``); kept on the CPU
    (small, gathered across ranks)."""
    found = top_triplet(x, init=init)
    nonzero = (found.sigma > 0).to(found.u.dtype).unsqueeze(-1)
    return Triplets(found.sigma.clone(), found.u * nonzero, found.v * nonzero).to("cpu")


class TripletSeries:
    """NExt's inputs and targets for a batch of matrices along a trajectory, one global delta per step.

    :meth:`add` takes ``g_t`` (``(N, m, n)``, float32) at each step in order and decomposes the
    global delta ``g_t``, the local delta ``g_t - g_{t-1}`` and the target ``g_t - g_{t-h}`` of
    step ``t - h`` (each by :func:`top_triplet`, warm-started from the same series' previous
    ``v``); it keeps the last ``h`` deltas (memory: ``h + 2`` matrices). :meth:`features` aligns
    the signs as the LoRA path does (:func:`~nextoffline.ops.chunk.aligned_features`).
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self._recent: list[torch.Tensor] = []
        self.global_: list[Triplets] = []
        self.local: list[Triplets] = []
        self.targets: list[Triplets] = []
        self.global_energy: list[torch.Tensor] = []
        self.local_energy: list[torch.Tensor | None] = [None]

    @staticmethod
    def _last_v(series: list[Triplets]) -> torch.Tensor | None:
        return series[-1].v if series and bool((series[-1].sigma > 0).all()) else None

    def add(self, delta: torch.Tensor) -> None:
        """Add the next step's global deltas ``(N, m, n)``."""
        self.global_.append(_triplets(delta, self._last_v(self.global_)))
        self.global_energy.append(delta.double().square().sum((-1, -2)).cpu())
        if self._recent:
            local = delta - self._recent[-1]
            self.local.append(_triplets(local, self._last_v(self.local)))
            self.local_energy.append(local.double().square().sum((-1, -2)).cpu())
        if len(self._recent) == self.horizon:
            self.targets.append(_triplets(delta - self._recent[0], self._last_v(self.targets)))
            self._recent.pop(0)
        if self.horizon > 0:
            self._recent.append(delta.clone())

    def features(self) -> Rank1Features:
        """The aligned series (``target[t]`` is ``None`` for the last ``h`` steps)."""
        self._recent.clear()
        return aligned_features(
            self.global_, self.local, self.targets, lag=1, global_energy=self.global_energy, local_energy=self.local_energy
        )


def truncated_features(features: Rank1Features, steps: int, horizon: int) -> Rank1Features:
    """The features a fit on the first ``steps`` checkpoints sees (a backtest prefix): alignment
    runs forward along the steps, so the prefix of the aligned series is the aligned prefix."""
    target = [t if i + horizon < steps else None for i, t in enumerate(features.target[:steps])]
    return Rank1Features(
        global_=features.global_[:steps],
        local=features.local[:steps],
        target=target,
        global_energy=features.global_energy[:steps],
        local_energy=features.local_energy[:steps],
    )
