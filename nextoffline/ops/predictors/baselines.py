"""The baselines users compare an extrapolation against, in the same factored math.

* ``expo``: two-point extrapolation of the last delta (ExPO-style):
  ``D = g (dW_last - dW_prev)`` with ``g = (t* - t_last) / (t_last - t_prev)``;
* ``lawa@W`` / ``ema``: checkpoint averaging as a denoiser (LAWA: the mean of the last ``W``
  checkpoints; EMA: weights halving per checkpoint back): ``D = average - dW_last``, the same
  for every target;
* ``alpharl``: AlphaRL-style rank-1 linear: the top singular pair ``(u, v)`` of the latest
  update is fixed, its coefficient ``c_i = u^T dW_i v`` gets a linear trend and
  ``D = (c(t*) - c(t_last)) u v^T``.

Each one fits every chunk on its own; the first three are weighted sums of the window's step
updates (:class:`~nextoffline.ops.predictors.trajectory.WindowUpdate`), so the backtest scores
them with the trajectory Gram.
"""

from __future__ import annotations

from typing import Any

import torch

from nextoffline.errors import NotEnoughCheckpointsError
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.decompose import top_triplet
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor, chunk_key
from nextoffline.ops.predictors.trajectory import WindowUpdate, window_grams
from nextoffline.ops.regressors import Regressor, make_regressor

__all__ = ["AlphaRLPredictor", "AveragePredictor", "ExpoPredictor"]

_F64 = torch.float64


class _WindowBaseline(Predictor):
    """A fixed-width window whose update weights do not need a fit."""

    fits_per_chunk = True
    width = 2

    def window_steps(self, num_steps: int) -> list[int]:
        size = min(self.width, num_steps)
        return list(range(num_steps - size, num_steps))

    def observe(self, chunk: FactorChunk) -> None:
        if chunk.num_steps < 2:
            raise NotEnoughCheckpointsError(f"{self.name} needs at least 2 checkpoints, got {chunk.num_steps}")

    def _window(self, chunk: FactorChunk) -> FactorChunk:
        return chunk.select_steps(self.window_steps(chunk.num_steps))


class ExpoPredictor(_WindowBaseline):
    """Two-point extrapolation of the last delta (ExPO-style)."""

    name = "expo"

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        window = self._window(chunk)
        t_prev, t_last = float(window.steps[0]), float(window.steps[-1])
        gain = (target_step - t_last) / (t_last - t_prev) if t_last > t_prev else 0.0
        weights = torch.tensor([-gain, gain], dtype=window.b.dtype, device=window.b.device).expand(len(window.names), 2)
        return WindowUpdate(window, weights.contiguous(), window_grams(window))

    def settings(self) -> dict[str, Any]:
        return {"predictor": "expo"}


class AveragePredictor(_WindowBaseline):
    """Checkpoint averaging (LAWA: uniform over the last ``window``; EMA: halving per checkpoint back)."""

    def __init__(self, kind: str = "lawa", window: int | None = None) -> None:
        self.kind = kind
        self.width = window or (5 if kind == "lawa" else 8)
        self.name = kind if window is None else f"{kind}@{window}"

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        del target_step  # a denoiser: the same estimate for every target
        window = self._window(chunk)
        w = window.num_steps
        if self.kind == "lawa":
            weights = torch.full((w,), 1.0 / w, dtype=_F64)
        else:
            weights = 0.5 ** torch.arange(w - 1, -1, -1, dtype=_F64)
            weights = weights / weights.sum()
        weights[-1] -= 1.0
        weights = weights.to(window.b).expand(len(window.names), w).contiguous()
        return WindowUpdate(window, weights, window_grams(window))

    def settings(self) -> dict[str, Any]:
        return {"predictor": self.kind, "window": self.width}


class AlphaRLPredictor(Predictor):
    """AlphaRL-style rank-1 linear: fixed top direction of the latest update, linear coefficient."""

    name = "alpharl"
    fits_per_chunk = True

    def __init__(self, regressor: str = "linear") -> None:
        self.regressor_name = regressor
        self._fits: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, Regressor, float]] = {}

    def observe(self, chunk: FactorChunk) -> None:
        if chunk.num_steps < 2:
            raise NotEnoughCheckpointsError(f"alpharl needs at least 2 checkpoints, got {chunk.num_steps}")
        scaled_b, a = chunk.update(chunk.num_steps - 1)
        top = top_triplet(scaled_b, a)
        u, v = top.u.to(chunk.b), top.v.to(chunk.a)  # (N, m), (N, n)
        scale = chunk.scaling.to(_F64)
        left = torch.einsum("nm,knmr->knr", u, chunk.b).to(_F64)  # u^T B_i
        right = torch.einsum("knrj,nj->knr", chunk.a, v).to(_F64)  # A_i v
        coefficients = scale * (left * right).sum(-1)  # (K, N): u^T dW_i v
        steps = chunk.steps.to(_F64).unsqueeze(0).expand(len(chunk.names), -1)
        regressor = make_regressor(self.regressor_name).fit(steps, coefficients.T)
        self._fits[chunk_key(chunk)] = (u.clone(), v.clone(), regressor, float(chunk.steps[-1]))

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        u, v, regressor, last_step = self._fits[chunk_key(chunk)]
        gain = regressor.predict(torch.tensor(target_step)) - regressor.predict(torch.tensor(last_step))
        left = (gain.to(u).unsqueeze(-1) * u).unsqueeze(-1)
        return FactoredUpdate(left.to(chunk.b.device), v.unsqueeze(-2).to(chunk.b.device))

    def settings(self) -> dict[str, Any]:
        return {"predictor": "alpharl", "regressor": self.regressor_name}
