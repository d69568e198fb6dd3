"""The predictor interface: observe chunks, fit, then predict factored updates chunk by chunk.

Predictors never see files. The pipeline streams :class:`FactorChunk` objects (modules of
one shape over the observed steps) twice: first to :meth:`Predictor.observe` (collect what
the fit needs), then, after :meth:`Predictor.fit`, to :meth:`Predictor.predict_update`.
A chunk's factor tensors are valid only until the pipeline moves to the next chunk (their
memory is reused): predictors keep computed results, never views of ``chunk.b``/``chunk.a``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.decompose import symmetric_blocks

__all__ = ["FactoredUpdate", "LatestPlusUpdate", "Predictor", "chunk_key"]


class FactoredUpdate:
    """A predicted update ``D = left @ right`` per module (``left`` ``(N, m, p)``, ``right`` ``(N, p, n)``).

    Re-factoring uses ``D`` only through :meth:`grams`, :meth:`cross`, :meth:`left_times` and
    :meth:`times_right`; predictors whose update has structure (a weighted sum of the window's
    factors, whose Grams they already hold) subclass it so that no stacked factor is formed.
    """

    def __init__(
        self, left: torch.Tensor, right: torch.Tensor, gram_left: torch.Tensor | None = None, gram_right: torch.Tensor | None = None
    ) -> None:
        self._left, self._right = left, right
        self._gram_left, self._gram_right = gram_left, gram_right

    @property
    def left(self) -> torch.Tensor:
        return self._left

    @property
    def right(self) -> torch.Tensor:
        return self._right

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left^T left, right right^T)``, each ``(N, p, p)``."""
        gram_left = self._gram_left if self._gram_left is not None else self.left.mT @ self.left
        gram_right = self._gram_right if self._gram_right is not None else self.right @ self.right.mT
        return gram_left, gram_right

    def cross(self, scaled_b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((s B)^T left, A right^T)`` for the latest factors ``s B`` ``(N, m, r)`` and ``A`` ``(N, r, n)``."""
        return scaled_b.mT @ self.left.to(scaled_b), a @ self.right.to(a).mT

    def left_times(self, coef: torch.Tensor) -> torch.Tensor:
        """``left @ coef`` for ``coef`` ``(N, p, q)``."""
        return self.left @ coef.to(self.left)

    def times_right(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef @ right`` for ``coef`` ``(N, q, p)``."""
        return coef.to(self.right) @ self.right

    def frobenius_sq(self) -> torch.Tensor:
        """``|D|_F^2`` per module (float64)."""
        gram_left, gram_right = self.grams()
        return (gram_left.to(torch.float64) * gram_right.to(torch.float64)).sum((-2, -1))

    def scaled(self, factor: float) -> FactoredUpdate:
        """``factor * D`` (damping toward the latest checkpoint); Grams reused when known."""
        gram_left = self._gram_left * factor**2 if self._gram_left is not None else None
        return FactoredUpdate(self.left * factor, self.right, gram_left, self._gram_right)

    def cross_delta(self, b1: torch.Tensor, a1: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        """``<D, s (B1 A1 - B0 A0)>`` per module (float64), through ``p x r`` products only."""
        s = scaling.to(torch.float64)
        out = torch.zeros(b1.shape[0], dtype=torch.float64, device=b1.device)
        for b, a, sign in ((b1, a1, 1.0), (b0, a0, -1.0)):
            cross_l = (self.left.mT @ b.to(self.left)).to(torch.float64)
            cross_r = (self.right @ a.to(self.right).mT).to(torch.float64)
            out += sign * s * (cross_l * cross_r).sum((-2, -1))
        return out

    def step_combination(self) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """``(steps, w)`` when ``D = sum_i w[:, i] dW_(steps[i])`` is a weighted sum of the updates
        at those steps of the chunk as read (then a trajectory Gram scores it), else ``None``."""
        return None

    def plus_latest(self, b: torch.Tensor, a: torch.Tensor, scaling: torch.Tensor) -> tuple[FactoredUpdate, slice]:
        """``M = s B A + D`` as one factored matrix, and the slice of its inner dimension that
        holds the latest factors (re-factoring starts from that block and anchors its gauge to it).

        The default stacks ``[s B, left]`` and ``[A; right]`` (width ``r + p``); predictors whose
        update already spans the latest factors fold them in instead.
        """
        return LatestPlusUpdate(scaling.to(b).reshape(-1, 1, 1) * b, a, self), slice(0, a.shape[-2])


class LatestPlusUpdate(FactoredUpdate):
    """``[s B, D_l] @ [A; D_r]``: the latest update plus ``D``, with Grams assembled from blocks
    (``D``'s own Grams and its cross terms with the latest factors come from ``D``, which may
    reuse what its predictor computed). Grams are float64."""

    def __init__(self, scaled_b: torch.Tensor, a: torch.Tensor, update: FactoredUpdate) -> None:
        self.scaled_b, self.a, self.update = scaled_b, a, update
        self._grams: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def left(self) -> torch.Tensor:
        return torch.cat([self.scaled_b, self.update.left.to(self.scaled_b)], dim=-1)

    @property
    def right(self) -> torch.Tensor:
        return torch.cat([self.a, self.update.right.to(self.a)], dim=-2)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grams is None:
            gram_dl, gram_dr = self.update.grams()
            cross_l, cross_r = self.update.cross(self.scaled_b, self.a)
            self._grams = (
                symmetric_blocks(self.scaled_b.mT @ self.scaled_b, cross_l, gram_dl),
                symmetric_blocks(self.a @ self.a.mT, cross_r, gram_dr),
            )
        return self._grams

    def left_times(self, coef: torch.Tensor) -> torch.Tensor:
        r = self.scaled_b.shape[-1]
        return self.scaled_b @ coef[..., :r, :].to(self.scaled_b) + self.update.left_times(coef[..., r:, :]).to(self.scaled_b)

    def times_right(self, coef: torch.Tensor) -> torch.Tensor:
        r = self.a.shape[-2]
        return coef[..., :r].to(self.a) @ self.a + self.update.times_right(coef[..., r:]).to(self.a)


def chunk_key(chunk: FactorChunk) -> tuple[str, ...]:
    """Identifies a chunk across the two passes."""
    return tuple(chunk.names)


class Predictor(ABC):
    """Predicts ``dW(step) - dW(last observed step)`` for every module."""

    name: ClassVar[str]
    #: True when :meth:`fit` does nothing and each chunk's prediction depends on that chunk only.
    fits_per_chunk: ClassVar[bool] = False

    @abstractmethod
    def observe(self, chunk: FactorChunk) -> None:
        """Pass 1: collect what the fit needs from one chunk of the observed trajectory."""

    def fit(self) -> None:  # noqa: B027 - optional hook: most predictors have nothing to train
        """After every chunk was observed (group-level models train here)."""

    @abstractmethod
    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        """Pass 2: the factored update from the last observed step to ``target_step``."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings for the provenance manifest."""

    def window_steps(self, num_steps: int) -> list[int]:
        """Indices of the observed steps :meth:`predict_update` needs (default: all)."""
        return list(range(num_steps))
