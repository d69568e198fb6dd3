"""NExt: nonlinear extrapolation of matrix rank-1 trajectories (arXiv 2604.11446).

Per module and checkpoint ``t`` the rank-1 triplets of the global delta ``dW_t`` and of the
local delta ``dW_t - dW_{t-1}`` are the inputs; the triplet of ``dW_{t+h} - dW_t`` is the
target. One small MLP per shape group and per kind of vector maps inputs to targets: ``u``
vectors (dimension ``m``), ``v`` vectors (``n``) and the vector of all sigmas of the group
(dimension = modules in the group) are the samples. Predict-extend adds
``coef * sigma u v^T`` (``u``, ``v`` renormalised) to the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nextoffline.errors import NotEnoughCheckpointsError
from nextoffline.ops.chunk import FactorChunk, rank1_features
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor, chunk_key

__all__ = ["NextPredictor", "NextNetwork"]

LOG = logging.getLogger(__name__)


class _Branch(nn.Sequential):
    """Linear(d, hidden) -> Linear(hidden, d) -> ReLU -> Linear(d, hidden) -> Linear(hidden, d)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.ReLU(), nn.Linear(dim, hidden), nn.Linear(hidden, dim))


class NextNetwork(nn.Module):
    """Two branches (global input, local input), concatenated, combined back to ``dim``."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.global_branch = _Branch(dim, hidden)
        self.local_branch = _Branch(dim, hidden)
        self.combine = nn.Linear(2 * dim, dim)

    def forward(self, global_input: torch.Tensor, local_input: torch.Tensor) -> torch.Tensor:
        return self.combine(torch.cat([self.global_branch(global_input), self.local_branch(local_input)], dim=-1))


@dataclass
class _Series:
    """Stacked, sign-aligned features of one chunk: ``(K, N, d)`` per kind; missing entries are NaN."""

    names: list[str]
    u: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    sigma: dict[str, torch.Tensor] = field(default_factory=dict)


def _stack(triplets: list, attr: str, like: torch.Tensor) -> torch.Tensor:
    rows = [getattr(t, attr).cpu() if t is not None else torch.full_like(like, float("nan")) for t in triplets]
    return torch.stack(rows).float()


class NextPredictor(Predictor):
    """The NExt predictor, trained per shape group on the compute device.

    Args:
        horizon: checkpoints ahead that the target delta spans (``h``).
        epochs: full-batch training epochs (reference: ~1000).
        lr: AdamW learning rate (reference 2e-5), cosine-decayed to 0.
        hidden: hidden width of each branch (reference 256).
        loss: ``"l1"`` or ``"l2"``.
        seed: seed of weight initialisation (training is deterministic on CPU).
        device: where the MLPs train (default: where the features live).
    """

    name = "next"

    def __init__(self, horizon: int = 1, *, epochs: int = 1000, lr: float = 2e-5, hidden: int = 256,
                 loss: str = "l1", seed: int = 0, device: str | torch.device | None = None) -> None:
        self.horizon = horizon
        self.epochs, self.lr, self.hidden, self.loss, self.seed = epochs, lr, hidden, loss, seed
        self.device = torch.device(device) if device is not None else None
        self._series: dict[tuple[str, ...], tuple[tuple[int, int, int], _Series]] = {}
        self._predicted: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._last_step = 0.0
        self._step_span = 1.0
        self.training_loss: dict[str, float] = {}

    def observe(self, chunk: FactorChunk) -> None:
        if chunk.num_steps < self.horizon + 2:
            raise NotEnoughCheckpointsError(
                f"next needs at least {self.horizon + 2} checkpoints for horizon {self.horizon}, got {chunk.num_steps}; "
                "use --horizon 1 or another --method"
            )
        self.device = self.device or chunk.b.device
        features = rank1_features(chunk, horizon=self.horizon)
        series = _Series(names=list(chunk.names))
        for kind, seq in (("global", features.global_), ("local", features.local), ("target", features.target)):
            like = features.global_[0]
            series.u[kind] = _stack(seq, "u", like.u.cpu())
            series.v[kind] = _stack(seq, "v", like.v.cpu())
            series.sigma[kind] = _stack(seq, "sigma", like.sigma.cpu())
        group = (chunk.b.shape[2], chunk.a.shape[3], chunk.b.shape[3])
        self._series[chunk_key(chunk)] = (group, series)
        steps = chunk.steps
        self._last_step = float(steps[-1])
        self._step_span = float((steps[-1] - steps[0]) / max(len(steps) - 1, 1)) * self.horizon

    @property
    def horizon_steps(self) -> float:
        """Training steps spanned by one predicted update (coefficient 1)."""
        return self._step_span

    def fit(self) -> None:
        groups: dict[tuple[int, int, int], list[tuple[tuple[str, ...], _Series]]] = {}
        for key, (group, series) in self._series.items():
            groups.setdefault(group, []).append((key, series))
        for group, members in groups.items():
            self._fit_group(group, members)

    def _fit_group(self, group: tuple[int, int, int], members: list[tuple[tuple[str, ...], _Series]]) -> None:
        label = "x".join(map(str, group))
        u_pred = self._train_and_predict(f"{label}/u", [s.u for _, s in members], per_module=True)
        v_pred = self._train_and_predict(f"{label}/v", [s.v for _, s in members], per_module=True)
        sigma_pred = self._train_and_predict(f"{label}/sigma", [s.sigma for _, s in members], per_module=False)
        offset = 0
        for key, series in members:
            count = len(series.names)
            sigma = sigma_pred[offset : offset + count].clamp_min(0)
            self._predicted[key] = (sigma, _unit(u_pred[offset : offset + count]), _unit(v_pred[offset : offset + count]))
            offset += count

    def _train_and_predict(self, label: str, parts: list[dict[str, torch.Tensor]], *, per_module: bool) -> torch.Tensor:
        """Train one network on the samples of a group; return its prediction from the last step."""
        glob = torch.cat([p["global"] for p in parts], dim=1)  # (K, N, d) or (K, N) for sigma
        local = torch.cat([p["local"] for p in parts], dim=1)
        target = torch.cat([p["target"] for p in parts], dim=1)
        if not per_module:  # one sample per step: the vector of all sigmas of the group
            glob, local, target = glob.unsqueeze(1), local.unsqueeze(1), target.unsqueeze(1)
        valid = ~(torch.isnan(local).flatten(2).any(-1) | torch.isnan(target).flatten(2).any(-1))[:, 0]
        x_g, x_l, y = glob[valid].flatten(0, 1), local[valid].flatten(0, 1), target[valid].flatten(0, 1)
        scale = _scale_of(x_g, x_l) if not per_module else 1.0
        net = self._train(x_g / scale, x_l / scale, y / scale, label)
        with torch.no_grad():
            out = net(glob[-1].to(self.device) / scale, local[-1].to(self.device) / scale).cpu() * scale
        return out if per_module else out.squeeze(0)

    def _train(self, x_g: torch.Tensor, x_l: torch.Tensor, y: torch.Tensor, label: str) -> NextNetwork:
        torch.manual_seed(self.seed)
        net = NextNetwork(x_g.shape[-1], self.hidden).to(self.device)
        x_g, x_l, y = x_g.to(self.device), x_l.to(self.device), y.to(self.device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.epochs, 1))
        criterion = nn.L1Loss() if self.loss == "l1" else nn.MSELoss()
        loss = torch.tensor(float("nan"))
        for _epoch in range(self.epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(x_g, x_l), y)
            loss.backward()
            optimizer.step()
            schedule.step()
        self.training_loss[label] = float(loss.detach())
        LOG.debug("next %s: %d samples, final %s loss %.3e", label, y.shape[0], self.loss, self.training_loss[label])
        return net.eval()

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        sigma, u, v = self._predicted[chunk_key(chunk)]
        coef = (target_step - self._last_step) / self._step_span if self._step_span else 0.0
        dtype, device = chunk.b.dtype, chunk.b.device
        left = (coef * sigma).reshape(-1, 1, 1).to(device, dtype) * u.unsqueeze(-1).to(device, dtype)
        return FactoredUpdate(left=left, right=v.unsqueeze(-2).to(device, dtype))

    def window_steps(self, num_steps: int) -> list[int]:
        return list(range(num_steps))

    def settings(self) -> dict[str, Any]:
        return {"predictor": "next", "horizon": self.horizon, "epochs": self.epochs, "lr": self.lr,
                "hidden": self.hidden, "loss": self.loss, "seed": self.seed}


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-30), torch.zeros_like(x))


def _scale_of(*tensors: torch.Tensor) -> float:
    """A positive scale that brings sigma samples to O(1) (the networks are scale-sensitive)."""
    values = torch.cat([t.abs().flatten() for t in tensors])
    mean = float(values[torch.isfinite(values)].mean()) if values.numel() else 1.0
    return mean if math.isfinite(mean) and mean > 0 else 1.0
