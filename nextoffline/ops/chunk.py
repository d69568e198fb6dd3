"""A batch of same-shape LoRA modules over all saved steps, in compute dtype on the compute device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextoffline.ops.decompose import Triplets, align_signs, align_to, difference_factors, top_triplet

__all__ = ["FactorChunk", "Rank1Features", "rank1_features"]


@dataclass
class FactorChunk:
    """Factors of ``N`` modules of identical shape at ``K`` steps.

    Attributes:
        names: module names, length ``N``.
        steps: ``(K,)`` float64 training steps, increasing.
        b: ``(K, N, m, r)`` LoRA B factors.
        a: ``(K, N, r, n)`` LoRA A factors.
        scaling: ``(N,)`` LoRA scalings (``alpha / r`` or ``alpha / sqrt(r)``).
    """

    names: list[str]
    steps: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor
    scaling: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.steps.shape[0])

    def update(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(s B_t, A_t)`` of the effective update ``dW_t`` (the global delta for LoRA)."""
        return self.scaling.to(self.b)[:, None, None] * self.b[t], self.a[t]

    def delta(self, t1: int, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of ``dW_t1 - dW_t0`` written without cancellation."""
        left, right = difference_factors(self.b[t1], self.a[t1], self.b[t0], self.a[t0])
        return self.scaling.to(left)[:, None, None] * left, right

    def select_steps(self, index: list[int]) -> "FactorChunk":
        """The same modules at a subset of steps (a prefix for backtests, a window for fits)."""
        return FactorChunk(self.names, self.steps[index], self.b[index], self.a[index], self.scaling)


@dataclass
class Rank1Features:
    """Sign-aligned rank-1 triplets along a trajectory (NExt inputs and targets).

    ``global_[t]`` decomposes ``dW_t``; ``local[t]`` decomposes ``dW_t - dW_{t-lag}``
    (``None`` for ``t < lag``); ``target[t]`` decomposes ``dW_{t+h} - dW_t`` (``None`` where
    ``t + h`` is past the end).
    """

    global_: list[Triplets]
    local: list[Triplets | None]
    target: list[Triplets | None]


def rank1_features(chunk: FactorChunk, *, horizon: int, lag: int = 1) -> Rank1Features:
    """Global, local and target rank-1 triplets for every step of ``chunk``.

    Each sequence is sign-aligned along the steps; each target is first aligned to the local
    delta of its step (the most recent movement), so the learning problem is consistent.
    """
    k = chunk.num_steps
    global_ = align_signs([top_triplet(*chunk.update(t)) for t in range(k)])
    local_seq = [top_triplet(*chunk.delta(t, t - lag)) for t in range(lag, k)]
    local: list[Triplets | None] = [None] * lag + list(align_signs(local_seq))
    target: list[Triplets | None] = [None] * k
    previous: Triplets | None = None
    for t in range(k - horizon):
        triplet = top_triplet(*chunk.delta(t + horizon, t))
        reference = previous if previous is not None else local[t]
        target[t] = align_to(triplet, reference) if reference is not None else triplet
        previous = target[t]
    return Rank1Features(global_=global_, local=local, target=target)
