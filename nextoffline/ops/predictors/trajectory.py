"""Trajectory rank-1 predictors (RELEX-style): one fixed direction per module, a trend in step.

Over a window of the last ``W`` checkpoints, the flattened updates ``dW_t`` of a module are
stacked into a ``W x (m n)`` matrix. Its top right singular vector is a direction ``V`` and
the left one gives a coefficient per step. Everything comes from the ``W x W`` Gram matrix
``<dW_i, dW_j>_F = s^2 tr((B_i^T B_j)(A_j A_i^T))``, and ``V`` stays a weighted sum of
factored matrices. A 1-D regressor extrapolates the coefficient to the target step; the
update is ``(c(t*) - c(t_last)) V``, so an exactly linear trajectory is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor, chunk_key
from nextoffline.ops.regressors import Regressor, make_regressor

__all__ = ["TrajectoryRank1Predictor", "trajectory_gram", "trajectory_rank1"]

_F64 = torch.float64


def trajectory_gram(chunk: FactorChunk) -> torch.Tensor:
    """``(N, K, K)`` Frobenius Gram of the updates ``dW_t`` of each module (float64)."""
    k, n_mod, m, r = chunk.b.shape
    b_cat = chunk.b.permute(1, 2, 0, 3).reshape(n_mod, m, k * r)
    a_cat = chunk.a.permute(1, 0, 2, 3).reshape(n_mod, k * r, -1)
    gb = (b_cat.mT @ b_cat).to(_F64).reshape(n_mod, k, r, k, r)
    ga = (a_cat @ a_cat.mT).to(_F64).reshape(n_mod, k, r, k, r)
    scale = chunk.scaling.to(_F64).reshape(-1, 1, 1) ** 2
    return scale * torch.einsum("niajb,niajb->nij", gb, ga)


@dataclass
class TrajectoryRank1:
    """Per module: unit direction weights over the window and per-step coefficients."""

    weights: torch.Tensor  # (N, W): V = sum_i weights[i] * dW_i, |V|_F = 1
    coefficients: torch.Tensor  # (N, W): <dW_i, V>
    explained: torch.Tensor  # (N,): fraction of the window's energy along V


def trajectory_rank1(chunk: FactorChunk) -> TrajectoryRank1:
    """Top trajectory direction of every module of ``chunk`` over all its steps."""
    gram = trajectory_gram(chunk)
    evals, evecs = torch.linalg.eigh(gram)
    top, e = evals[:, -1].clamp_min(0), evecs[:, :, -1]
    e = e * torch.where(e.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(e)
    root = top.sqrt()
    safe = root > 0
    weights = torch.where(safe.unsqueeze(-1), e / root.clamp_min(1e-300).unsqueeze(-1), torch.zeros_like(e))
    total = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    explained = torch.where(total > 0, top / total.clamp_min(1e-300), torch.ones_like(total)).clamp(0, 1)
    return TrajectoryRank1(weights=weights, coefficients=root.unsqueeze(-1) * e, explained=explained)


class TrajectoryRank1Predictor(Predictor):
    """RELEX-style predictor; the trend model is any registered regressor.

    Args:
        regressor: ``linear`` (RELEX), ``power``, ``poly`` or ``gp``.
        window: number of most recent checkpoints used (``None`` = all).
    """

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
        rank1 = trajectory_rank1(window)
        steps = window.steps.to(_F64).unsqueeze(0).expand(len(chunk.names), -1)
        regressor = make_regressor(self.regressor_name).fit(steps, rank1.coefficients)
        last_step = float(window.steps[-1])
        self._fits[chunk_key(chunk)] = (rank1, regressor, last_step)

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        rank1, regressor, last_step = self._fits[chunk_key(chunk)]
        window = chunk.select_steps(self.window_steps(chunk.num_steps))
        gain = regressor.predict(torch.tensor(target_step)) - regressor.predict(torch.tensor(last_step))
        alphas = (gain.unsqueeze(-1) * rank1.weights).to(window.b)  # (N, W)
        scale = window.scaling.to(window.b).reshape(1, -1, 1, 1)
        left = (alphas.T.reshape(window.num_steps, -1, 1, 1) * scale * window.b).permute(1, 2, 0, 3)
        left = left.reshape(len(chunk.names), window.b.shape[2], -1)
        right = window.a.permute(1, 0, 2, 3).reshape(len(chunk.names), -1, window.a.shape[-1])
        return FactoredUpdate(left=left, right=right)

    def explained(self, chunk: FactorChunk) -> torch.Tensor:
        """Fraction of the window energy along the fitted direction, per module."""
        return self._fits[chunk_key(chunk)][0].explained

    def settings(self) -> dict[str, Any]:
        return {"predictor": "trajectory-rank1", "regressor": self.regressor_name, "window": self.window}
