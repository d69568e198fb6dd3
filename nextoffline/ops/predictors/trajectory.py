"""Trajectory rank-1 predictors (RELEX-style): one fixed direction per module, a trend in step.

Over a window of the last ``W`` checkpoints, the flattened updates ``dW_t`` of a module are
stacked into a ``W x (m n)`` matrix. Its top right singular vector is a direction ``V`` and
the left one gives a coefficient per step. Everything comes from the ``W x W`` Gram matrix
``<dW_i, dW_j>_F = s^2 tr((B_i^T B_j)(A_j A_i^T))``, and ``V`` stays a weighted sum of
factored matrices. A 1-D regressor extrapolates the coefficient to the target step; the
update is ``(c(t*) - c(t_last)) V``, so an exactly linear trajectory is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nextoffline.ops.chunk import FactorChunk, contiguous_index
from nextoffline.ops.decompose import stacked_gram
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor, chunk_key
from nextoffline.ops.regressors import Regressor, make_regressor

__all__ = [
    "GramCache",
    "TrajectoryRank1",
    "TrajectoryRank1Predictor",
    "TrajectoryRankKPredictor",
    "TrajectoryTopK",
    "WindowGrams",
    "WindowUpdate",
    "direction_component",
    "gram_cache_bytes",
    "memoise_window_grams",
    "rank1_from_gram",
    "shared_trajectory_gram",
    "trajectory_energy",
    "trajectory_rank1",
    "trajectory_topk",
    "window_grams",
]

_F64 = torch.float64


@dataclass
class WindowGrams:
    """Gram matrices of the stacked factors of a window (compute dtype, scaling not applied).

    ``b = B_cat^T B_cat`` and ``a = A_cat A_cat^T``, both ``(N, K r, K r)``, with
    ``B_cat = [B_1, ..., B_K]`` and ``A_cat = [A_1; ...; A_K]``.
    """

    b: torch.Tensor
    a: torch.Tensor
    _trajectory: tuple[tuple, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def trajectory(self, scaling: torch.Tensor, rank: int) -> torch.Tensor:
        """``(N, K, K)`` Frobenius Gram ``<dW_i, dW_j>`` (float64; computed once per scaling)."""
        key = (rank, tuple(scaling.tolist()))
        if self._trajectory is None or self._trajectory[0] != key:
            n_mod, kr = self.b.shape[0], self.b.shape[-1]
            k = kr // rank
            gb = self.b.to(_F64).reshape(n_mod, k, rank, k, rank)
            ga = self.a.to(_F64).reshape(n_mod, k, rank, k, rank)
            gram = scaling.to(_F64).reshape(-1, 1, 1) ** 2 * torch.einsum("niajb,niajb->nij", gb, ga)
            self._trajectory = (key, gram)
        return self._trajectory[1]


class GramCache:
    """The trajectory predictors' slot in :class:`~nextoffline.ops.chunk.ChunkCache`: window
    Grams of one chunk as read, over all its steps and per observed window."""

    def __init__(self) -> None:
        self.full: WindowGrams | None = None
        self.windows: dict[tuple[int, ...], WindowGrams] = {}


def window_grams(chunk: FactorChunk) -> WindowGrams:
    """Gram matrices of the stacked factors of every module of ``chunk`` (all its steps).

    Memoised per window on the chunk as read (observing and predicting the same window share
    one computation). When the Grams over all its steps are memoised
    (:func:`memoise_window_grams`) and the window is a contiguous run of them, they are a slice
    of those (no GEMM).
    """
    cache = chunk.cache.get(GramCache)
    key = chunk.step_origin
    if key not in cache.windows:
        at = contiguous_index(list(key))
        if cache.full is not None and isinstance(at, slice):
            rows = slice(at.start * chunk.b.shape[-1], at.stop * chunk.b.shape[-1])
            cache.windows[key] = WindowGrams(b=cache.full.b[..., rows, rows], a=cache.full.a[..., rows, rows])
        else:
            cache.windows[key] = _stacked_grams(chunk)
    return cache.windows[key]


def memoise_window_grams(chunk: FactorChunk, dtype: torch.dtype | None = None) -> WindowGrams:
    """Window Grams over every step of a chunk as read, kept for the chunks selected from it
    (several predictors observing windows of one chunk then share one computation).

    ``dtype`` (default: the chunk's) is the precision of the Gram products; float64 when
    quadratic forms of them cancel (backtest scores of near-exact predictions).
    """
    if chunk.origin is not None:
        raise ValueError("memoise_window_grams needs the chunk as read, not a selection of its steps")
    cache = chunk.cache.get(GramCache)
    if cache.full is None:
        cache.full = _stacked_grams(chunk, dtype)
    return cache.full


def shared_trajectory_gram(chunk: FactorChunk) -> torch.Tensor:
    """``(N, K, K)`` float64 ``<dW_i, dW_j>`` over every step of a chunk as read; its Grams are
    memoised for the trajectory predictors that observe windows of it (one computation serves
    them and the backtest's quadratic-form scores)."""
    return memoise_window_grams(chunk, torch.float64).trajectory(chunk.scaling, chunk.b.shape[-1])


def gram_cache_bytes(chunk: FactorChunk) -> int:
    """Bytes :func:`shared_trajectory_gram` keeps: float64 window Grams of every step, both sides."""
    width = chunk.num_steps * chunk.b.shape[-1]
    return 2 * len(chunk.names) * width * width * 8


def _stacked_grams(chunk: FactorChunk, dtype: torch.dtype | None = None) -> WindowGrams:
    k, n_mod, m, r = chunk.b.shape
    b_cat = chunk.b.permute(1, 2, 0, 3).reshape(n_mod, m, k * r).to(dtype or chunk.b.dtype)
    a_cat = chunk.a.permute(1, 0, 2, 3).reshape(n_mod, k * r, -1).to(dtype or chunk.a.dtype)
    return WindowGrams(b=stacked_gram(b_cat.mT), a=stacked_gram(a_cat))


@dataclass
class TrajectoryRank1:
    """Per module: unit direction weights over the window and per-step coefficients."""

    weights: torch.Tensor  # (N, W): V = sum_i weights[i] * dW_i, |V|_F = 1
    coefficients: torch.Tensor  # (N, W): <dW_i, V>
    explained: torch.Tensor  # (N,): fraction of the window's energy along V


def trajectory_rank1(chunk: FactorChunk, grams: WindowGrams | None = None) -> TrajectoryRank1:
    """Top trajectory direction of every module of ``chunk`` over all its steps."""
    return rank1_from_gram((grams or window_grams(chunk)).trajectory(chunk.scaling, chunk.b.shape[-1]))


def rank1_from_gram(gram: torch.Tensor) -> TrajectoryRank1:
    """Top trajectory direction from the ``(N, W, W)`` Frobenius Gram ``<dW_i, dW_j>`` of a window
    (shared by the factored LoRA path and the dense full-parameter path)."""
    evals, evecs = torch.linalg.eigh(gram)
    top, e = evals[:, -1].clamp_min(0), evecs[:, :, -1]
    e = e * torch.where(e.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(e)
    root = top.sqrt()
    safe = root > 0
    weights = torch.where(safe.unsqueeze(-1), e / root.clamp_min(1e-300).unsqueeze(-1), torch.zeros_like(e))
    total = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    explained = torch.where(total > 0, top / total.clamp_min(1e-300), torch.ones_like(total)).clamp(0, 1)
    return TrajectoryRank1(weights=weights, coefficients=root.unsqueeze(-1) * e, explained=explained)


def trajectory_energy(chunk: FactorChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Per module: the fraction of the trajectory's energy on its top direction, and
    ``|dW_latest|_F^2`` (the weight of that fraction when summed over modules)."""
    grams = window_grams(chunk)
    rank1 = trajectory_rank1(chunk, grams)
    return rank1.explained, grams.trajectory(chunk.scaling, chunk.b.shape[-1])[:, -1, -1]


def direction_component(update: FactoredUpdate, chunk: FactorChunk, weights: torch.Tensor) -> torch.Tensor:
    """``<D_j, V_j>`` per module (float64), with ``V_j = sum_i weights[j, i] s_j B_i A_i`` the
    trajectory direction of ``chunk`` (:attr:`TrajectoryRank1.weights`), without dense matrices."""
    left = update.left.to(_F64)  # (N, m, p)
    right = update.right.to(_F64)  # (N, p, n)
    b = chunk.b.to(_F64).transpose(0, 1)  # (N, K, m, r)
    a = chunk.a.to(_F64).transpose(0, 1)  # (N, K, r, n)
    lb = left.mT.unsqueeze(1) @ b  # (N, K, p, r)
    ra = right.unsqueeze(1) @ a.mT  # (N, K, p, r)
    inner = (lb * ra).sum((-1, -2))  # (N, K): <D, B_i A_i>
    return chunk.scaling.to(_F64) * (inner * weights.to(_F64)).sum(-1)


@dataclass
class TrajectoryTopK:
    """Per module: the top ``k`` temporal directions of a window (``V_j = sum_i weights[:, j, i] dW_i``,
    orthonormal) and each step's coefficient on them (``coefficients[:, j, i] = <dW_i, V_j>``)."""

    weights: torch.Tensor  # (N, k, W)
    coefficients: torch.Tensor  # (N, k, W)
    explained: torch.Tensor  # (N,): fraction of the window's energy in the k directions


def trajectory_topk(chunk: FactorChunk, grams: WindowGrams | None = None, k: int | None = None, rel_tol: float = 1e-10) -> TrajectoryTopK:
    """Top ``k`` (default: all with energy above ``rel_tol`` of the top) temporal directions of
    every module of ``chunk``: the eigenvectors of its ``W x W`` trajectory Gram."""
    gram = (grams or window_grams(chunk)).trajectory(chunk.scaling, chunk.b.shape[-1])
    evals, evecs = torch.linalg.eigh(gram)
    count = gram.shape[-1] if k is None else min(k, gram.shape[-1])
    evals, evecs = evals.flip(-1)[:, :count].clamp_min(0), evecs.flip(-1)[..., :count]  # (N, k), (N, W, k)
    evecs = evecs * torch.where(evecs.sum(-2, keepdim=True) < 0, -1.0, 1.0).to(evecs)
    keep = evals > rel_tol * evals[:, :1].clamp_min(1e-300)
    root = evals.sqrt()
    weights = torch.where(keep.unsqueeze(-2), evecs / root.clamp_min(1e-300).unsqueeze(-2), torch.zeros_like(evecs)).mT
    coefficients = torch.where(keep.unsqueeze(-2), evecs * root.unsqueeze(-2), torch.zeros_like(evecs)).mT
    total = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    kept = (evals * keep).sum(-1)
    explained = torch.where(total > 0, kept / total.clamp_min(1e-300), torch.ones_like(total)).clamp(0, 1)
    return TrajectoryTopK(weights=weights, coefficients=coefficients, explained=explained)


class WindowUpdate(FactoredUpdate):
    """``D = sum_i w_i s B_i A_i`` over a window whose last step is the latest checkpoint.

    The stacked factors ``left = [w_1 s B_1, ..., w_W s B_W]`` and ``right = [A_1; ...; A_W]``
    are only formed if :attr:`left` / :attr:`right` are read; re-factoring works block by block
    and takes the Grams (and the cross terms with the latest factors, their last block rows)
    from the :class:`WindowGrams` the predictor computed when it observed the window.
    """

    def __init__(self, window: FactorChunk, weights: torch.Tensor, grams: WindowGrams | None) -> None:
        self.window = window
        self.weights = weights  # (N, W): w_i
        self.block_weights = weights * window.scaling.to(weights).unsqueeze(-1)  # (N, W): w_i s
        self.window_grams = grams
        self._gram_left = self._gram_right = None  # the stacked form's Grams, if ever needed

    def plus_latest(self, b: torch.Tensor, a: torch.Tensor, scaling: torch.Tensor) -> tuple[FactoredUpdate, slice]:
        """``s B A + D`` is again a weighted sum of the window's updates (the latest one's weight
        plus one), so its Grams are the window Grams re-weighted: width ``W r``, not ``(W + 1) r``."""
        if self.window_grams is None or not (
            _same_tensor(b, self.window.b[-1]) and _same_tensor(a, self.window.a[-1]) and _same_tensor(scaling, self.window.scaling)
        ):
            return super().plus_latest(b, a, scaling)
        weights = self.weights.clone()
        weights[:, -1] += 1
        r = a.shape[-2]
        return WindowUpdate(self.window, weights, self.window_grams), slice(weights.shape[-1] * r - r, weights.shape[-1] * r)

    def scaled(self, factor: float) -> WindowUpdate:
        """``factor * D``: the same window with scaled weights (its Grams are reused)."""
        return WindowUpdate(self.window, self.weights * factor, self.window_grams)

    def step_combination(self) -> tuple[tuple[int, ...], torch.Tensor]:
        """``D = sum_i w_i dW_(steps[i])``: the window's steps (in the chunk as read) and ``w``."""
        return self.window.step_origin, self.weights

    def frobenius_sq(self) -> torch.Tensor:
        """``w^T T w`` with the window's trajectory Gram ``T`` (no pass over the factor Grams)."""
        if self.window_grams is None:
            return super().frobenius_sq()
        gram = self.window_grams.trajectory(self.window.scaling, self.window.b.shape[-1])
        w = self.weights.to(gram)
        return torch.einsum("ni,nij,nj->n", w, gram, w)

    @property
    def left(self) -> torch.Tensor:
        b = self.window.b * self.block_weights.T.reshape(self.window.num_steps, -1, 1, 1)
        return b.permute(1, 2, 0, 3).reshape(b.shape[1], b.shape[2], -1)

    @property
    def right(self) -> torch.Tensor:
        a = self.window.a
        return a.permute(1, 0, 2, 3).reshape(a.shape[1], -1, a.shape[-1])

    def _columns(self) -> torch.Tensor:
        return self.block_weights.repeat_interleave(self.window.b.shape[-1], dim=-1)  # (N, W r)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window_grams is None:
            return super().grams()
        col = self._columns().to(self.window_grams.b)
        return col.unsqueeze(-1) * self.window_grams.b * col.unsqueeze(-2), self.window_grams.a

    def cross(self, scaled_b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the last block rows of the window Grams (``scaled_b``, ``a`` must be the latest factors)."""
        if self.window_grams is None:
            return super().cross(scaled_b, a)
        r = a.shape[-2]
        scaling = self.window.scaling.to(self.window_grams.b).reshape(-1, 1, 1)
        col = self._columns().to(self.window_grams.b).unsqueeze(-2)
        return scaling * self.window_grams.b[..., -r:, :] * col, self.window_grams.a[..., -r:, :]

    def left_times(self, coef: torch.Tensor) -> torch.Tensor:
        r, b = self.window.b.shape[-1], self.window.b
        coef = coef.to(b) * self._columns().to(b).unsqueeze(-1)
        out = b[0] @ coef[..., :r, :]
        for i in range(1, self.window.num_steps):
            out.baddbmm_(b[i], coef[..., i * r : (i + 1) * r, :])
        return out

    def times_right(self, coef: torch.Tensor) -> torch.Tensor:
        r, a = self.window.a.shape[-2], self.window.a
        coef = coef.to(a)
        out = coef[..., :r] @ a[0]
        for i in range(1, self.window.num_steps):
            out.baddbmm_(coef[..., i * r : (i + 1) * r], a[i])
        return out


class TrajectoryRank1Predictor(Predictor):
    """RELEX-style predictor; the trend model is any registered regressor.

    Args:
        regressor: ``linear`` (RELEX), ``power``, ``poly`` or ``gp``.
        window: number of most recent checkpoints used (``None`` = all).
    """

    #: Each chunk is fitted on its own: the pipeline may predict right after observing it.
    fits_per_chunk = True

    def __init__(self, regressor: str = "linear", window: int | None = None) -> None:
        self.regressor_name = regressor
        self.window = window
        self.name = regressor if window is None else f"{regressor}@{window}"
        self._fits: dict[tuple[str, ...], tuple[TrajectoryRank1, Regressor, float]] = {}

    def window_steps(self, num_steps: int) -> list[int]:
        size = num_steps if self.window is None else min(self.window, num_steps)
        return list(range(num_steps - size, num_steps))

    def observe(self, chunk: FactorChunk) -> None:
        window = chunk.select_steps(self.window_steps(chunk.num_steps))
        grams = window_grams(window)
        rank1 = trajectory_rank1(window, grams)
        steps = window.steps.to(_F64).unsqueeze(0).expand(len(chunk.names), -1)
        regressor = make_regressor(self.regressor_name).fit(steps, rank1.coefficients)
        last_step = float(window.steps[-1])
        self._fits[chunk_key(chunk)] = (rank1, regressor, last_step)

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        rank1, regressor, last_step = self._fits[chunk_key(chunk)]
        window = chunk.select_steps(self.window_steps(chunk.num_steps))
        gain = regressor.predict(torch.tensor(target_step)) - regressor.predict(torch.tensor(last_step))
        alphas = (gain.unsqueeze(-1) * rank1.weights).to(window.b)  # (N, W)
        return WindowUpdate(window, alphas, window_grams(window))  # memoised when observe saw this chunk

    def explained(self, chunk: FactorChunk) -> torch.Tensor:
        """Fraction of the window energy along the fitted direction, per module."""
        return self._fits[chunk_key(chunk)][0].explained

    def settings(self) -> dict[str, Any]:
        return {"predictor": "trajectory-rank1", "regressor": self.regressor_name, "window": self.window}


class TrajectoryRankKPredictor(TrajectoryRank1Predictor):
    """Window trend over the top ``k`` temporal directions: each direction's coefficient gets its
    own trend (directions that rotate slowly while the update grows are followed, which the
    single top direction cannot do). ``k = None`` keeps every direction above numerical noise,
    i.e. a trend of the whole window in its span.

    Args:
        regressor: trend of each coefficient (``linear`` by default).
        window: most recent checkpoints used (``None`` = all).
        k: directions kept (``None`` = all).
    """

    def __init__(self, regressor: str = "linear", window: int | None = None, k: int | None = None, label: str = "rotate") -> None:
        super().__init__(regressor, window)
        self.k = k
        self.name = label if window is None else f"{label}@{window}"
        self._topk: dict[tuple[str, ...], tuple[TrajectoryTopK, Regressor, float]] = {}

    def observe(self, chunk: FactorChunk) -> None:
        window = chunk.select_steps(self.window_steps(chunk.num_steps))
        topk = trajectory_topk(window, window_grams(window), self.k)
        n_mod, count, width = topk.coefficients.shape
        steps = window.steps.to(_F64).reshape(1, 1, -1).expand(n_mod, count, width).reshape(n_mod * count, width)
        regressor = make_regressor(self.regressor_name).fit(steps, topk.coefficients.reshape(n_mod * count, width))
        self._topk[chunk_key(chunk)] = (topk, regressor, float(window.steps[-1]))

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        topk, regressor, last_step = self._topk[chunk_key(chunk)]
        window = chunk.select_steps(self.window_steps(chunk.num_steps))
        gain = regressor.predict(torch.tensor(target_step)) - regressor.predict(torch.tensor(last_step))
        n_mod, count, _width = topk.weights.shape
        alphas = (gain.reshape(n_mod, count, 1) * topk.weights).sum(1).to(window.b)  # (N, W)
        return WindowUpdate(window, alphas, window_grams(window))

    def explained(self, chunk: FactorChunk) -> torch.Tensor:
        return self._topk[chunk_key(chunk)][0].explained

    def settings(self) -> dict[str, Any]:
        return {"predictor": "trajectory-rank-k", "regressor": self.regressor_name, "window": self.window, "k": self.k}


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same values: the same memory (a view of the same storage) or, failing that, equal."""
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
        return True
    return bool(torch.equal(x, y))
