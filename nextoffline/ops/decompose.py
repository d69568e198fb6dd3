"""Batched rank-1 decomposition of factored matrices, never forming the dense ``m x n`` matrix.

A factored matrix is ``X = L @ R`` with ``L`` of shape ``(N, m, k)`` and ``R`` of shape
``(N, k, n)`` (a batch of ``N`` modules of identical shape). Its top singular triplet comes
from the two ``k x k`` Gram matrices ``L^T L`` and ``R R^T`` (BLAS-3, cost ``(m + n) k^2``),
small eigen-problems in float64, and one lift back to ``m``/``n`` vectors, refined by a
Rayleigh quotient. Differences of two LoRA updates are rewritten without cancellation:
``B1 A1 - B0 A0 = (B1 - B0) A1 + B0 (A1 - A0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Triplets",
    "gram_left",
    "gram_right",
    "top_triplet",
    "difference_factors",
    "frobenius_sq",
    "inner_product",
    "align_signs",
    "align_to",
]

_SMALL = torch.float64


@dataclass
class Triplets:
    """Top singular triplets of a batch: ``X[i] ~= sigma[i] * outer(u[i], v[i])``."""

    sigma: torch.Tensor  # (N,)
    u: torch.Tensor  # (N, m), unit norm (zeros when sigma == 0)
    v: torch.Tensor  # (N, n), unit norm (zeros when sigma == 0)

    def to(self, device: torch.device | str) -> "Triplets":
        return Triplets(self.sigma.to(device), self.u.to(device), self.v.to(device))

    def scaled(self, factor: torch.Tensor) -> "Triplets":
        """Triplets of ``factor[i] * X[i]`` for positive ``factor``."""
        return Triplets(self.sigma * factor.to(self.sigma), self.u, self.v)


def gram_left(left: torch.Tensor) -> torch.Tensor:
    """``L^T L`` for ``L`` of shape ``(N, m, k)``."""
    return left.mT @ left


def gram_right(right: torch.Tensor) -> torch.Tensor:
    """``R R^T`` for ``R`` of shape ``(N, k, n)``."""
    return right @ right.mT


def _psd_factor(gram: torch.Tensor, rel_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-split a batch of PSD Grams into (eigvecs, sqrt(eigvals) with noise floored to 0)."""
    evals, evecs = torch.linalg.eigh(gram.to(_SMALL))
    top = evals[..., -1:].clamp_min(0)
    keep = evals > rel_tol * top
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    return evecs, root


def top_triplet(
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    gram_l: torch.Tensor | None = None,
    gram_r: torch.Tensor | None = None,
    rel_tol: float = 1e-6,
) -> Triplets:
    """Top singular triplet of ``left @ right`` for every matrix of the batch.

    Args:
        left: ``(N, m, k)`` factors.
        right: ``(N, k, n)`` factors.
        gram_l: optional precomputed ``left^T left`` (lets callers reuse Gram blocks).
        gram_r: optional precomputed ``right right^T``.
        rel_tol: eigenvalues of a (balanced) Gram below ``rel_tol * max`` count as zero
            (rank-deficient factors).

    Returns:
        Triplets with ``sigma >= 0``; all-zero ``u``/``v`` where the product is zero.
    """
    gram_l = (gram_left(left) if gram_l is None else gram_l).to(_SMALL)
    gram_r = (gram_right(right) if gram_r is None else gram_r).to(_SMALL)
    scale = _balancing_scale(gram_l, gram_r)
    gram_l = scale.unsqueeze(-1) * gram_l * scale.unsqueeze(-2)
    gram_r = gram_r / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    w_l, root_l = _psd_factor(gram_l, rel_tol)
    inv_root_l = torch.where(root_l > 0, 1.0 / root_l.clamp_min(1e-300), torch.zeros_like(root_l))
    # core = diag(root_l) W_l^T G_r W_l diag(root_l): its eigenvalues are sigma(X)^2
    core = root_l.unsqueeze(-1) * (w_l.mT @ gram_r @ w_l) * root_l.unsqueeze(-2)
    _evals, evecs = torch.linalg.eigh(0.5 * (core + core.mT))
    z = evecs[..., -1]
    coef_u = (scale * (w_l @ (inv_root_l * z).unsqueeze(-1)).squeeze(-1)).to(left.dtype)  # u = L a
    u = (left @ coef_u.unsqueeze(-1)).squeeze(-1)
    v = (right.mT @ (left.mT @ u.unsqueeze(-1))).squeeze(-1)  # X^T u: one Rayleigh refinement
    return _normalise(left, right, u, v)


def _balancing_scale(gram_l: torch.Tensor, gram_r: torch.Tensor) -> torch.Tensor:
    """Diagonal ``d`` making column ``j`` of ``L d`` and row ``j`` of ``d^-1 R`` equally long.

    Differences of nearby checkpoints mix columns of very different scale; balancing keeps
    the eigen-problems well conditioned (the product ``L R`` is unchanged).
    """
    col = torch.diagonal(gram_l, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    row = torch.diagonal(gram_r, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    live = (col > 0) & (row > 0)
    return torch.where(live, (row / col.clamp_min(1e-300)).sqrt(), torch.ones_like(col))


def _normalise(left: torch.Tensor, right: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Triplets:
    """Unit-normalise ``v``, recompute ``u = X v / |X v|`` and ``sigma = |X v|``; zeros stay zeros."""
    v_norm = v.norm(dim=-1, keepdim=True)
    v = torch.where(v_norm > 0, v / v_norm.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))
    xv = (left @ (right @ v.unsqueeze(-1))).squeeze(-1)
    sigma = xv.norm(dim=-1)
    u = torch.where(sigma.unsqueeze(-1) > 0, xv / sigma.clamp_min(torch.finfo(xv.dtype).tiny).unsqueeze(-1), torch.zeros_like(xv))
    zero = v_norm.squeeze(-1) == 0
    sigma = torch.where(zero, torch.zeros_like(sigma), sigma)
    return Triplets(sigma=sigma, u=u, v=v)


def difference_factors(
    b1: torch.Tensor, a1: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``B1 A1 - B0 A0`` as ``[B1 - B0, B0] @ [A1; A1 - A0]`` (no cancellation)."""
    left = torch.cat([b1 - b0, b0], dim=-1)
    right = torch.cat([a1, a1 - a0], dim=-2)
    return left, right


def inner_product(left1: torch.Tensor, right1: torch.Tensor, left2: torch.Tensor, right2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner products ``<L1 R1, L2 R2>`` per batch item, via ``k x k`` products only."""
    cross_l = (left1.mT @ left2).to(_SMALL)
    cross_r = (right1 @ right2.mT).to(_SMALL)
    return (cross_l * cross_r).sum(dim=(-2, -1))


def frobenius_sq(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of ``L @ R`` per batch item."""
    return inner_product(left, right, left, right)


def align_to(current: Triplets, reference: Triplets) -> Triplets:
    """Flip ``(u, v)`` pairs (product unchanged) so they point like ``reference``."""
    score = (current.u * reference.u.to(current.u)).sum(-1) + (current.v * reference.v.to(current.v)).sum(-1)
    sign = torch.where(score < 0, -1.0, 1.0).to(current.u.dtype).unsqueeze(-1)
    return Triplets(current.sigma, current.u * sign, current.v * sign)


def align_signs(sequence: list[Triplets]) -> list[Triplets]:
    """Align every triplet to the previous one of the sequence, so trajectories are smooth."""
    aligned: list[Triplets] = []
    for item in sequence:
        aligned.append(align_to(item, aligned[-1]) if aligned else item)
    return aligned
