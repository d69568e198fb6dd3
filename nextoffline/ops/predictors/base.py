"""The predictor interface: observe chunks, fit, then predict factored updates chunk by chunk.

Predictors never see files. The pipeline streams :class:`FactorChunk` objects (modules of
one shape over the observed steps) twice: first to :meth:`Predictor.observe` (collect what
the fit needs), then, after :meth:`Predictor.fit`, to :meth:`Predictor.predict_update`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from nextoffline.ops.chunk import FactorChunk

__all__ = ["FactoredUpdate", "Predictor", "chunk_key"]


@dataclass
class FactoredUpdate:
    """A predicted update ``D = left @ right`` per module (``left`` ``(N, m, p)``, ``right`` ``(N, p, n)``)."""

    left: torch.Tensor
    right: torch.Tensor

    def scaled(self, coef: torch.Tensor | float) -> "FactoredUpdate":
        coef = torch.as_tensor(coef, dtype=self.left.dtype, device=self.left.device)
        return FactoredUpdate(self.left * coef.reshape(-1, 1, 1) if coef.ndim else self.left * coef, self.right)


def chunk_key(chunk: FactorChunk) -> tuple[str, ...]:
    """Identifies a chunk across the two passes."""
    return tuple(chunk.names)


class Predictor(ABC):
    """Predicts ``dW(step) - dW(last observed step)`` for every module."""

    name: ClassVar[str]

    @abstractmethod
    def observe(self, chunk: FactorChunk) -> None:
        """Pass 1: collect what the fit needs from one chunk of the observed trajectory."""

    def fit(self) -> None:
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
