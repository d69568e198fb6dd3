"""NExt: nonlinear extrapolation of matrix rank-1 trajectories (arXiv 2604.11446).

Faithful to the reference code (RUCAIBox/NExt ``src/train.py``, ``src/extrapolate.py``):

* per module and checkpoint ``t`` the rank-1 triplets of the global delta ``dW_t`` and of the
  local delta ``dW_t - dW_{t-1}`` (``dW_t`` itself at the first checkpoint, as the reference
  measures it against the base) are the inputs; the triplet of ``dW_{t+h} - dW_t`` is the target;
* one network per vector length: all ``u`` of length ``d`` share a model, all ``v`` of length
  ``d`` another, and all sigmas one model with ``d = 1``; a sample is one vector at one step;
* network: two branches (global, local) ``Linear(d,256) Linear(256,d) ReLU Linear(d,256)
  Linear(256,d)``, concatenated, combined by ``Linear(2d,256) Linear(256,2d) ReLU
  Linear(2d,256) Linear(256,d)``; raw inputs and targets (no normalisation);
* training: full batch, L1 (or L2) summed over elements and divided by the number of
  checkpoints, AdamW (lr 2e-5, weight decay 0.01), cosine schedule to 0.1 lr, 1000 epochs;
* predict-extend: from the latest checkpoint's triplets, ``u`` and ``v`` renormalised, sigma
  used as predicted; ``coef * sigma u v^T`` is added to the latest adapter.

Differences, on purpose: triplets come from the LoRA factors (never dense merges), only LoRA
modules are modelled, signs are aligned along the trajectory (the reference does not; SVD sign
flips would otherwise enter the training data), and training is seeded (deterministic on CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nextoffline.errors import NotEnoughCheckpointsError
from nextoffline.ops.chunk import FactorChunk, Rank1Features, contiguous_index, rank1_features
from nextoffline.ops.predictors.base import FactoredUpdate, Predictor, chunk_key

__all__ = ["NextNetwork", "NextOptions", "NextPredictor", "projected_fit_seconds"]

LOG = logging.getLogger(__name__)

#: Bytes of one ``d``-wide activation per forward slice during training (bounds peak memory).
ACTIVATION_BYTES = 16 * 2**20
#: A network whose projected training time reaches this many seconds is announced (warning).
LONG_TRAINING_S = 300.0


class _Branch(nn.Sequential):
    """Linear(d, hidden) -> Linear(hidden, d) -> ReLU -> Linear(d, hidden) -> Linear(hidden, out)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.ReLU(), nn.Linear(dim, hidden), nn.Linear(hidden, out or dim))


class NextNetwork(nn.Module):
    """Two branches (global input, local input), concatenated, combined back to ``dim``."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.global_branch = _Branch(dim, hidden)
        self.local_branch = _Branch(dim, hidden)
        self.combine = _Branch(2 * dim, hidden, out=dim)

    def forward(self, global_input: torch.Tensor, local_input: torch.Tensor) -> torch.Tensor:
        return self.combine(torch.cat([self.global_branch(global_input), self.local_branch(local_input)], dim=-1))


@dataclass
class _Samples:
    """Rows of one network: inputs/targets per step ``(K, rows, d)``; NaN where undefined."""

    global_: list[torch.Tensor] = field(default_factory=list)
    local: list[torch.Tensor] = field(default_factory=list)
    target: list[torch.Tensor] = field(default_factory=list)
    owners: list[tuple[tuple[str, ...], int]] = field(default_factory=list)  # (chunk key, rows) in order


def _stack(triplets: list, attr: str, like: torch.Tensor) -> torch.Tensor:
    rows = [getattr(t, attr).float().cpu() if t is not None else torch.full_like(like, float("nan")) for t in triplets]
    return torch.stack(rows)


@dataclass(frozen=True)
class NextOptions:
    """NExt training hyperparameters (see :class:`NextPredictor`)."""

    epochs: int = 1000
    lr: float = 2e-5
    hidden: int = 256
    loss: str = "l1"
    seed: int = 0


class NextPredictor(Predictor):
    """The NExt predictor (see module docstring), trained on the compute device.

    Args:
        horizon: checkpoints ahead that the target delta spans (``h``; reference 5).
        epochs: full-batch training epochs (reference 1000).
        lr: AdamW learning rate (reference 2e-5), cosine-decayed to ``0.1 * lr``.
        hidden: hidden width (reference 256).
        loss: ``"l1"`` (reference script) or ``"l2"``.
        seed: seed of weight initialisation (training is deterministic on CPU).
        device: where the networks train (default: where the features live).
    """

    name = "next"

    def __init__(
        self,
        horizon: int = 1,
        *,
        epochs: int = 1000,
        lr: float = 2e-5,
        hidden: int = 256,
        loss: str = "l1",
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        self.horizon = horizon
        self.epochs, self.lr, self.hidden, self.loss, self.seed = epochs, lr, hidden, loss, seed
        self.device = torch.device(device) if device is not None else None
        self._samples: dict[tuple[str, int], _Samples] = {}
        self._predicted: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self._last_step = 0.0
        self._step_span = 1.0
        self.training_loss: dict[str, float] = {}

    def observe(self, chunk: FactorChunk) -> None:
        if chunk.num_steps < self.horizon + 1:
            raise NotEnoughCheckpointsError(
                f"next needs at least {self.horizon + 1} checkpoints for horizon {self.horizon}, got {chunk.num_steps}; "
                "lower --horizon or use another --method"
            )
        self.device = self.device or chunk.b.device
        self.observe_features(chunk_key(chunk), rank1_features(chunk, horizon=self.horizon), chunk.steps)

    def observe_features(self, key: tuple[str, ...], features: Rank1Features, steps: torch.Tensor) -> None:
        """Add the triplet series of one batch of matrices (``key`` names them for :meth:`predicted_triplet`):
        the entry point of matrices that are not LoRA factors (dense full-parameter deltas)."""
        local = [features.global_[0], *features.local[1:]]  # the reference's first local delta is against the base
        like = features.global_[0]
        rows = int(like.sigma.shape[0])
        for kind, dim in (("u", like.u.shape[-1]), ("v", like.v.shape[-1]), ("sigma", 1)):
            attr_like = getattr(like, kind).float().cpu()
            samples = self._samples.setdefault((kind, int(dim)), _Samples())
            for name, seq in (("global_", features.global_), ("local", local), ("target", features.target)):
                stacked = _stack(seq, kind, attr_like)
                getattr(samples, name).append(stacked.unsqueeze(-1) if kind == "sigma" else stacked)
            samples.owners.append((key, rows))
        self._last_step = float(steps[-1])
        self._step_span = float((steps[-1] - steps[0]) / max(len(steps) - 1, 1)) * self.horizon

    @property
    def horizon_steps(self) -> float:
        """Training steps spanned by one predicted update (coefficient 1)."""
        return self._step_span

    def fit(self) -> None:
        # smallest networks first, each group's samples dropped once it is trained: the peak is
        # the widest network with its own samples only
        for kind, dim in sorted(self._samples, key=lambda group: group[1]):
            samples = self._samples.pop((kind, dim))
            prediction = self._train_and_predict(f"{kind}[{dim}]", samples)
            offset = 0
            for key, rows in samples.owners:
                self._predicted.setdefault(key, {})[kind] = prediction[offset : offset + rows]
                offset += rows

    def _train_and_predict(self, label: str, samples: _Samples) -> torch.Tensor:
        """Train one network on every row of ``samples``; return its prediction from the last step."""
        stacked = []
        for name in ("global_", "local", "target"):
            stacked.append(torch.cat(getattr(samples, name), dim=1))
            setattr(samples, name, [])  # the parts are not needed twice
        glob, local, target = stacked
        has_target = ~torch.isnan(target).flatten(1).any(-1)
        valid = contiguous_index(has_target.nonzero().flatten().tolist())  # a view when contiguous (the usual case)
        net = self._train(glob[valid], local[valid], target[valid], label)
        with torch.no_grad():
            return net(glob[-1].to(self.device), local[-1].to(self.device)).cpu()

    def _train(self, x_g: torch.Tensor, x_l: torch.Tensor, y: torch.Tensor, label: str) -> NextNetwork:
        """Full-batch training; inputs ``(steps, rows, d)``; loss summed, divided by the steps.

        The batch goes through the network in slices whose ``d``-wide activations stay near
        :data:`ACTIVATION_BYTES`, their gradients summed before the optimizer step: the same
        full-batch gradient (the network is row-wise), with bounded memory.
        """
        torch.manual_seed(self.seed)
        steps, rows_per_step, dim = x_g.shape
        net = NextNetwork(dim, self.hidden).to(self.device)
        x_g, x_l, y = (t.reshape(-1, dim).to(self.device) for t in (x_g, x_l, y))
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.epochs, 1), eta_min=0.1 * self.lr)
        rows = max(1, ACTIVATION_BYTES // (4 * dim))
        loss = torch.tensor(float("nan"))
        started = time.perf_counter()
        for epoch in range(self.epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=self.device)
            for start in range(0, y.shape[0], rows):
                part = slice(start, start + rows)
                error = net(x_g[part], x_l[part]) - y[part]
                piece = (error.abs() if self.loss == "l1" else error.square()).sum() / max(steps, 1)
                piece.backward()
                loss += piece.detach()
            optimizer.step()
            schedule.step()
            if epoch == 0:
                self._warn_if_long(label, dim, started)
        self.training_loss[label] = float(loss)
        LOG.debug("next %s: %d rows x %d steps, final %s loss %.3e", label, rows_per_step, steps, self.loss, self.training_loss[label])
        return net.eval()

    def _warn_if_long(self, label: str, dim: int, started: float) -> None:
        """Say so, early, when one network's training will take long (the reference 1000 epochs
        of the widest 7B-shaped network take over an hour on a 2-core CPU)."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        first_epoch_s = time.perf_counter() - started
        projected = first_epoch_s * self.epochs
        if projected >= LONG_TRAINING_S:
            LOG.warning(
                "next: training the %s network (d = %d) takes ~%.0f min on %s (%d epochs at %.2f s each); "
                "lower --next-epochs or pick another --method to finish sooner",
                label,
                dim,
                projected / 60,
                self.device,
                self.epochs,
                first_epoch_s,
            )

    def predicted_triplet(self, key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The predicted update triplet ``(sigma, u, v)`` of the matrices ``key`` (``u``, ``v`` unit)."""
        predicted = self._predicted[key]
        return predicted["sigma"].squeeze(-1), _unit(predicted["u"]), _unit(predicted["v"])

    def coefficient(self, target_step: float) -> float:
        """How many predicted updates (horizons) reach ``target_step`` from the last observed step."""
        return (target_step - self._last_step) / self._step_span if self._step_span else 0.0

    def predict_update(self, chunk: FactorChunk, target_step: float) -> FactoredUpdate:
        sigma, u, v = self.predicted_triplet(chunk_key(chunk))
        coef = self.coefficient(target_step)
        dtype, device = chunk.b.dtype, chunk.b.device
        left = (coef * sigma).reshape(-1, 1, 1).to(device, dtype) * u.unsqueeze(-1).to(device, dtype)
        return FactoredUpdate(left=left, right=v.unsqueeze(-2).to(device, dtype))

    def settings(self) -> dict[str, Any]:
        return {
            "predictor": "next",
            "horizon": self.horizon,
            "epochs": self.epochs,
            "lr": self.lr,
            "hidden": self.hidden,
            "loss": self.loss,
            "seed": self.seed,
        }


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-30), torch.zeros_like(x))


#: Nominal training throughput used to project NExt's cost before any data is read (flop/s), and the
#: fixed cost of one network's training step (s): measured on the 2-core AVX2 CPU of
#: benchmarks/RESULTS.md (7.7 s per epoch of the 7B-shaped networks; ~1.5 ms per step of a tiny one)
#: and kept constant so that the same run always makes the same choice.
NOMINAL_FLOPS = {"cpu": 8e10, "cuda": 5e12}
NOMINAL_STEP_S = {"cpu": 1.5e-3, "cuda": 1e-3}


def projected_fit_seconds(
    groups: list[tuple[int, int, int]], *, epochs: int, hidden: int = 256, device: torch.device | str = "cpu"
) -> float:
    """Projected training time of one NExt fit, before any data is read.

    ``groups`` lists ``(d, rows, samples per row)`` of each network. One training step costs a
    fixed :data:`NOMINAL_STEP_S` plus its flops (about ``15 d hidden`` parameters, six flops per
    parameter and sample) at :data:`NOMINAL_FLOPS`.
    """
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    total = 0.0
    for dim, rows, samples in groups:
        if rows * samples == 0:
            continue
        total += NOMINAL_STEP_S[kind] + 90.0 * dim * hidden * rows * samples / NOMINAL_FLOPS[kind]
    return total * epochs
