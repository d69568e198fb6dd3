"""One-dimensional trend models for per-module coefficient trajectories ``c(step)``.

Each regressor fits ``N`` independent series at once: ``fit(x, y)`` with ``x``/``y`` of shape
``(N, W)`` and ``predict(x_new)`` returning ``(N,)``. Steps are normalised internally so
polynomial features stay well conditioned.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch

__all__ = [
    "REGRESSORS",
    "GaussianProcessTrend",
    "LinearTrend",
    "LogTrend",
    "PolyRidge",
    "PowerTrend",
    "Regressor",
    "SaturatingTrend",
    "make_regressor",
]

_F64 = torch.float64


class Regressor(ABC):
    """A batch of 1-D trend models."""

    name: ClassVar[str]

    @abstractmethod
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> Regressor:
        """Fit ``N`` series; ``x`` and ``y`` have shape ``(N, W)``."""

    @abstractmethod
    def predict(self, x_new: torch.Tensor) -> torch.Tensor:
        """Values at ``x_new`` of shape ``(N,)`` or scalar; returns ``(N,)`` float64."""


class _Normalised(Regressor, ABC):
    """Shared step normalisation: ``z = (x - x_last) / span``."""

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(_F64) - self._origin) / self._span

    def _set_frame(self, x: torch.Tensor) -> None:
        x = x.to(_F64)
        self._origin = x[:, -1:]
        self._span = (x[:, -1:] - x[:, :1]).clamp_min(1e-12)

    @staticmethod
    def _column(x_new: torch.Tensor, n: int) -> torch.Tensor:
        return torch.as_tensor(x_new, dtype=_F64).reshape(-1, 1).expand(n, 1)


def _batched_lstsq(design: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Solve ``min |design @ w - y|^2 + ridge |w|^2`` for each batch item (float64)."""
    gram = design.mT @ design
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[-1], dtype=_F64, device=gram.device)
    rhs = design.mT @ y.unsqueeze(-1)
    return torch.linalg.lstsq(gram, rhs).solution.squeeze(-1)


class LinearTrend(_Normalised):
    """``c(t) = a + b t`` by least squares (RELEX)."""

    name = "linear"

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> LinearTrend:
        self._set_frame(x)
        z = self._normalise(x)
        design = torch.stack([torch.ones_like(z), z], dim=-1)
        self._coef = _batched_lstsq(design, y.to(_F64))
        return self

    def predict(self, x_new: torch.Tensor) -> torch.Tensor:
        z = self._normalise(self._column(x_new, self._coef.shape[0])).squeeze(-1)
        return self._coef[:, 0] + self._coef[:, 1] * z


def _fit_over_grid(
    y: torch.Tensor, grid: Sequence[float], feature: Callable[[float], torch.Tensor], *, initial: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per series, ``a + b f_k`` with ``k`` from ``grid`` by least squares (batched 2 x 2 problems).

    Returns the ``(N, 2)`` coefficients and the chosen ``k`` per series (``initial`` where no grid
    point gives a finite error).
    """
    best_err = torch.full((y.shape[0],), float("inf"), dtype=_F64)
    best_coef = torch.zeros(y.shape[0], 2, dtype=_F64)
    chosen = torch.full((y.shape[0],), float(initial), dtype=_F64)
    for k in grid:
        feat = feature(k)
        design = torch.stack([torch.ones_like(feat), feat], dim=-1)
        coef = _batched_lstsq(design, y)
        err = ((design @ coef.unsqueeze(-1)).squeeze(-1) - y).square().sum(-1)
        better = err < best_err * (1 - 1e-9)
        best_err = torch.where(better, err, best_err)
        best_coef = torch.where(better.unsqueeze(-1), coef, best_coef)
        chosen = torch.where(better, torch.full_like(chosen, k), chosen)
    return best_coef, chosen


class PowerTrend(Regressor):
    """``c(t) = a + b t^p``, the exponent chosen per series from a grid by least squares.

    ``p = 1`` is the linear trend; ``p < 1`` captures the saturating (sqrt-like) growth of
    RL training; ``p > 1`` accelerating growth.
    """

    name = "power"
    EXPONENTS: ClassVar[tuple[float, ...]] = (0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0, 1.5, 2.0)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> PowerTrend:
        x, y = x.to(_F64), y.to(_F64)
        self._scale = x[:, -1:].abs().clamp_min(1e-12)
        base = (x / self._scale).clamp_min(0)
        self._coef, self._power = _fit_over_grid(y, self.EXPONENTS, lambda p: base**p, initial=1.0)
        return self

    def predict(self, x_new: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x_new, dtype=_F64).reshape(-1, 1).expand(self._coef.shape[0], 1)
        feat = (x / self._scale).clamp_min(0).squeeze(-1) ** self._power
        return self._coef[:, 0] + self._coef[:, 1] * feat


class _GridTrend(Regressor, ABC):
    """``c(t) = a + b f_k(t)`` with the shape parameter ``k`` of ``f`` chosen per series from a grid
    by least squares (all series and grid points solved as batched 2 x 2 problems)."""

    GRID: ClassVar[tuple[float, ...]]

    @abstractmethod
    def _feature(self, x: torch.Tensor, k: float) -> torch.Tensor:
        """``f_k(x)`` for ``x`` ``(N, W)`` float64 in the fitted frame."""

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> _GridTrend:
        x, y = x.to(_F64), y.to(_F64)
        self._origin, self._last = x[:, :1], x[:, -1:]
        self._span = (x[:, -1:] - x[:, :1]).clamp_min(1e-12)
        self._coef, self._shape = _fit_over_grid(y, self.GRID, lambda k: self._feature(x, k), initial=self.GRID[0])
        return self

    def predict(self, x_new: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x_new, dtype=_F64).reshape(-1, 1).expand(self._coef.shape[0], 1)
        feat = self._features_at(x)
        return self._coef[:, 0] + self._coef[:, 1] * feat

    def _features_at(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], dtype=_F64)
        for k in set(self._shape.tolist()):
            rows = self._shape == k
            out[rows] = self._feature(x, k)[rows, 0]
        return out


class LogTrend(_GridTrend):
    """``c(t) = a + b log(1 + t / tau)``: logarithmic (slowing, never flat) growth; ``tau`` from a
    grid of multiples of the last fitted step."""

    name = "log"
    GRID: ClassVar[tuple[float, ...]] = (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0)

    def _feature(self, x: torch.Tensor, k: float) -> torch.Tensor:
        return torch.log1p((x / (k * self._last.abs().clamp_min(1e-12))).clamp_min(-0.999))


class SaturatingTrend(_GridTrend):
    """``c(t) = a + b exp(-(t - t_0) / tau)``: growth (or decay) towards a plateau ``a``; ``tau``
    from a grid of multiples of the fitted span (large ``tau`` is nearly linear)."""

    name = "sat"
    GRID: ClassVar[tuple[float, ...]] = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 8.0)

    def _feature(self, x: torch.Tensor, k: float) -> torch.Tensor:
        z = (x - self._origin) / self._span
        return torch.exp(-z / k)


class _SklearnPerSeries(_Normalised, ABC):
    """Fits one scikit-learn estimator per series on normalised steps."""

    @abstractmethod
    def _estimator(self): ...

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> _SklearnPerSeries:
        self._set_frame(x)
        z = self._normalise(x).cpu().numpy()
        targets = y.to(_F64).cpu().numpy()
        self._models = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for row_z, row_y in zip(z, targets):
                self._models.append(self._estimator().fit(row_z.reshape(-1, 1), row_y))
        return self

    def predict(self, x_new: torch.Tensor) -> torch.Tensor:
        z = self._normalise(self._column(x_new, len(self._models))).cpu().numpy()
        values = [model.predict(row.reshape(-1, 1))[0] for model, row in zip(self._models, z)]
        return torch.as_tensor(np.asarray(values, dtype=np.float64))


class PolyRidge(_SklearnPerSeries):
    """Quadratic trend with a small ridge penalty (scikit-learn ``PolynomialFeatures`` + ``Ridge``)."""

    name = "poly"

    def __init__(self, degree: int = 2, alpha: float = 1e-6) -> None:
        self.degree, self.alpha = degree, alpha

    def _estimator(self):
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import PolynomialFeatures

        return make_pipeline(PolynomialFeatures(self.degree), Ridge(alpha=self.alpha))


class GaussianProcessTrend(_SklearnPerSeries):
    """Gaussian process with a linear (DotProduct) + RBF + noise kernel, normalised targets."""

    name = "gp"

    def _estimator(self):
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, DotProduct, WhiteKernel

        kernel = ConstantKernel(1.0) * DotProduct(sigma_0=1.0) + ConstantKernel(0.1) * RBF(1.0) + WhiteKernel(1e-4)
        return GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=0)


REGRESSORS: dict[str, type[Regressor]] = {
    cls.name: cls for cls in (LinearTrend, PowerTrend, LogTrend, SaturatingTrend, PolyRidge, GaussianProcessTrend)
}


def make_regressor(name: str) -> Regressor:
    """A fresh regressor by registry name."""
    return REGRESSORS[name]()
