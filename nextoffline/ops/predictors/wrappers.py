"""Predictor wrappers: another time axis than the step (log-step, cumulative learning rate); damping."""

from __future__ import annotations

from typing import Any

import torch

from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.forecast import TimeAxis
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor

__all__ = ["DampedPredictor", "OnTimeAxis", "on_axis"]


def on_axis(chunk: FactorChunk, axis: TimeAxis) -> FactorChunk:
    """The same chunk (factors, cache and step origin shared) with its steps mapped by ``axis``."""
    steps = torch.tensor(axis.map(chunk.steps.tolist()), dtype=chunk.steps.dtype, device=chunk.steps.device)
    return FactorChunk(chunk.names, steps, chunk.b, chunk.a, chunk.scaling, origin=chunk.origin, cache=chunk.cache)


class OnTimeAxis(Predictor):
    """``inner`` sees every chunk with its steps mapped by ``axis`` and predicts at ``axis(target)``."""

    def __init__(self, inner: Predictor, axis: TimeAxis, label: str) -> None:
        self.inner, self.axis, self.name = inner, axis, label
        self.fits_per_chunk = inner.fits_per_chunk

    def observe(self, chunk: FactorChunk) -> None:
        self.inner.observe(on_axis(chunk, self.axis))

    def fit(self) -> None:
        self.inner.fit()

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        return self.inner.predict_update(on_axis(chunk, self.axis), self.axis(target_step))

    def window_steps(self, num_steps: int) -> list[int]:
        return self.inner.window_steps(num_steps)

    def settings(self) -> dict[str, Any]:
        return {**self.inner.settings(), "time_axis": self.axis.kind}

    def __getattr__(self, name: str) -> Any:  # e.g. ``explained`` of trajectory predictors
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class DampedPredictor(Predictor):
    """``inner``'s update to each target scaled by its damping ``a`` (``last + a (forecast - last)``;
    targets not listed are not damped)."""

    def __init__(self, inner: Predictor, dampings: dict[float, float]) -> None:
        self.inner, self.dampings = inner, dict(dampings)
        self.name = inner.name
        self.fits_per_chunk = inner.fits_per_chunk

    def observe(self, chunk: FactorChunk) -> None:
        self.inner.observe(chunk)

    def fit(self) -> None:
        self.inner.fit()

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        update = self.inner.predict_update(chunk, target_step)
        damping = self.dampings.get(float(target_step), 1.0)
        return update if damping == 1.0 else update.scaled(damping)

    def window_steps(self, num_steps: int) -> list[int]:
        return self.inner.window_steps(num_steps)

    def settings(self) -> dict[str, Any]:
        return self.inner.settings()
