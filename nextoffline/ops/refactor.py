"""Write a predicted update back into LoRA factors.

``M = s B A + D`` (``D`` factored, rank ``p``) is re-factored to the best rank-``r`` factors
``(B', A')`` with ``s B' A' ~= M``, in a gauge as close as possible to the latest ``A`` so
that optimizer moments of the resumed run stay meaningful. Rank ``r + p`` can instead be kept
exactly (``grow``). Coefficient 0 (``D = 0``) returns ``(B, A)`` untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextoffline.ops.decompose import balance_grams, top_eigvecs
from nextoffline.ops.predictors.base import FactoredUpdate

__all__ = ["RefactorResult", "refactor_grow_rank", "refactor_keep_rank"]

_F64 = torch.float64
_MAX_GAUGE_CONDITION = 1e6


@dataclass
class RefactorResult:
    """New factors per module and what the truncation kept."""

    b: torch.Tensor  # (N, m, r')
    a: torch.Tensor  # (N, r', n)
    kept_energy: torch.Tensor  # (N,): 1 - |M - M_r|^2 / |D|^2 (1.0 when D = 0)
    gauge_reset: torch.Tensor  # (N,) bool: the A-anchored gauge was ill-conditioned


def _orthonormal_basis(gram: torch.Tensor, rel_tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and sqrt-eigenvalues of a PSD Gram with noise floored to zero."""
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > rel_tol * evals[..., -1:].clamp_min(0)
    return evecs, torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))


def _low_rank_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U S V^T`` of ``left @ right`` from Gram matrices (float64), never dense."""
    left64, right64 = left.to(_F64), right.to(_F64)
    w_l, root_l = _orthonormal_basis(left64.mT @ left64)
    w_r, root_r = _orthonormal_basis(right64 @ right64.mT)
    core = (root_l.unsqueeze(-1) * (w_l.mT @ w_r)) * root_r.unsqueeze(-2)  # Q_l^T L R Q_r
    uc, s, vch = torch.linalg.svd(core)
    inv_l = torch.where(root_l > 0, 1 / root_l.clamp_min(1e-300), torch.zeros_like(root_l))
    inv_r = torch.where(root_r > 0, 1 / root_r.clamp_min(1e-300), torch.zeros_like(root_r))
    u = left64 @ (w_l * inv_l.unsqueeze(-2)) @ uc  # Q_l = L W_l diag(1/root_l)
    v = right64.mT @ (w_r * inv_r.unsqueeze(-2)) @ vch.mT
    return u, s, v


def refactor_keep_rank(b: torch.Tensor, a: torch.Tensor, scaling: torch.Tensor, update: FactoredUpdate) -> RefactorResult:
    """Best rank-``r`` factors of ``s B A + D`` in the gauge closest to ``A``.

    ``M = L R`` comes from :meth:`FactoredUpdate.plus_latest` (``L = [s B, D_l]``,
    ``R = [A; D_r]``, or the window's own factors when ``D`` already spans the latest ones).
    Its Gram matrices come from the update (which reuses what its predictor computed), the top
    ``r`` eigenpairs of ``Gl Gr`` give ``V_r = R^T Y`` and ``U_r S_r = L Gr Y``
    (:func:`~nextoffline.ops.decompose.top_eigvecs`, started from the latest ``A``), and the
    new factors are formed straight from ``L`` and ``R``: nothing of size ``m x n`` or
    ``m x p'`` is materialised.

    Args:
        b: ``(N, m, r)`` latest B factors (compute dtype).
        a: ``(N, r, n)`` latest A factors.
        scaling: ``(N,)`` LoRA scalings.
        update: the predicted update ``D``.
    """
    r = b.shape[-1]
    s = scaling.to(b).reshape(-1, 1, 1)
    total, latest = update.plus_latest(b, a, scaling)
    update_sq = update.frobenius_sq().to(_F64).clamp_min(0)  # |D|^2
    total_sq = total.frobenius_sq().to(_F64).clamp_min(0)  # |M|^2
    gram_l, gram_r = total.grams()
    gl, gr, scale = balance_grams(gram_l, gram_r)
    del gram_l
    start = torch.zeros(gl.shape[-1], r, dtype=_F64, device=gl.device)
    start[latest] = torch.eye(r, dtype=_F64, device=gl.device)  # the latest A
    y, lam = top_eigvecs(gl, gr, r, start=start.expand(gl.shape[0], -1, -1), total=total_sq)
    coef_v = y / scale.unsqueeze(-1)  # V_r = R^T coef_v
    coef_us = scale.unsqueeze(-1) * (gr @ y)  # U_r S_r = L coef_us
    tail_sq = (total_sq - lam.sum(-1)).clamp_min(0)
    kept = torch.where(update_sq > 0, 1 - tail_sq / update_sq.clamp_min(1e-300), torch.ones_like(update_sq)).clamp(0, 1)
    gauge = gram_r[..., latest, :].to(_F64) @ coef_v  # A V_r: the G minimising |G V_r^T - A|
    coef_a, coef_b, reset = _anchor_gauge(gauge, lam.clamp_min(0).sqrt(), coef_v, coef_us)
    new_a = total.times_right(coef_a.mT).to(a)
    new_b = total.left_times(coef_b).to(b) / s
    zero = update_sq == 0
    new_b = torch.where(zero.reshape(-1, 1, 1), b, new_b)
    new_a = torch.where(zero.reshape(-1, 1, 1), a, new_a)
    return RefactorResult(b=new_b.to(b.dtype), a=new_a.to(a.dtype), kept_energy=kept, gauge_reset=reset & ~zero)


def _anchor_gauge(gauge: torch.Tensor, sigma: torch.Tensor, coef_v: torch.Tensor, coef_us: torch.Tensor):
    """Coefficients of ``A' = G V_r^T`` and ``s B' = U_r S_r G^-1`` (balanced SVD factors
    ``sqrt(S_r)`` where ``G`` is ill-conditioned): ``A' = coef_a^T R``, ``s B' = L coef_b``."""
    cond = torch.linalg.cond(gauge)
    reset = ~torch.isfinite(cond) | (cond > _MAX_GAUGE_CONDITION)
    eye = torch.eye(gauge.shape[-1], dtype=_F64, device=gauge.device).expand_as(gauge)
    safe_gauge = torch.where(reset.reshape(-1, 1, 1), torch.diag_embed(sigma.sqrt() + (sigma <= 0)), gauge)
    inv = torch.linalg.solve(safe_gauge, eye)
    return coef_v @ safe_gauge.mT, coef_us @ inv, reset


def refactor_grow_rank(
    b: torch.Tensor, a: torch.Tensor, scaling: torch.Tensor, update: FactoredUpdate, *, rel_tol: float = 1e-7
) -> RefactorResult:
    """Exact factors of rank ``r + p``: ``B' = [B, D_l / s]``, ``A' = [A; D_r]``.

    ``p`` is 1 for rank-1 updates (NExt); a wider update is first compressed to its numerical
    rank (singular values above ``rel_tol`` of the largest, the widest over the batch).
    """
    d_left, d_right = update.left, update.right
    if d_left.shape[-1] > 1:
        u, sv, v = _low_rank_svd(d_left, d_right)
        keep = int((sv > rel_tol * sv[..., :1].clamp_min(1e-300)).sum(-1).max().clamp_min(1))
        d_left, d_right = (u[..., :keep] * sv[..., None, :keep]).to(b.dtype), v[..., :keep].mT.to(a.dtype)
    s = scaling.to(d_left).reshape(-1, 1, 1)
    new_b = torch.cat([b, (d_left / s).to(b.dtype)], dim=-1)
    new_a = torch.cat([a, d_right.to(a.dtype)], dim=-2)
    ones = torch.ones(b.shape[0], dtype=_F64, device=b.device)
    return RefactorResult(b=new_b, a=new_a, kept_energy=ones, gauge_reset=torch.zeros_like(ones, dtype=torch.bool))
