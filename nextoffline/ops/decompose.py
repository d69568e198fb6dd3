"""Batched rank-1 decomposition of factored matrices, never forming the dense ``m x n`` matrix.

A factored matrix is ``X = L @ R`` with ``L`` of shape ``(N, m, k)`` and ``R`` of shape
``(N, k, n)`` (a batch of ``N`` modules of identical shape). Its top singular triplet comes
from the two ``k x k`` Gram matrices ``L^T L`` and ``R R^T`` (BLAS-3, cost ``(m + n) k^2``,
the only work proportional to the factor sizes), a small eigen-problem in float64 and one
lift back to ``m``/``n`` vectors (one pass over each factor). Differences of two LoRA updates
are rewritten without cancellation: ``B1 A1 - B0 A0 = (B1 - B0) A1 + B0 (A1 - A0)``.

The small problem. With ``Gl = L^T L`` and ``Gr = R R^T`` (balanced, see
:func:`_balancing_scale`), ``X^T X R^T y = R^T (Gl Gr y)``: the top right singular vector is
``v = R^T y`` for the top eigenvector ``y`` of ``M = Gl Gr`` (self-adjoint in the ``Gr`` inner
product, eigenvalues ``sigma^2``). It is found by block subspace iteration on ``M`` with a
Rayleigh-Ritz step in the ``Gr`` metric (batched ``k x k`` by ``k x b`` products, ``b = 8``),
stopped when the relative residual ``|X^T X v - sigma^2 v| / sigma^2`` is below ``1e-7``;
members that do not converge (nearly equal top singular values) fall back to a full
eigen-decomposition. ``u = X v / |X v| = L (Gr y) / |.|`` needs no refinement pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextoffline.ops.device import single_thread

__all__ = [
    "Triplets",
    "align_signs",
    "align_to",
    "balance_grams",
    "difference_factors",
    "frobenius_sq",
    "gram_left",
    "gram_right",
    "inner_product",
    "stacked_gram",
    "symmetric_blocks",
    "top_eigvec",
    "top_eigvecs",
    "top_triplet",
]

_SMALL = torch.float64

#: Columns of the subspace iteration block.
BLOCK = 8
#: Relative residual at which a top eigenpair counts as converged (in sigma^2 units).
RESIDUAL_TOL = 1e-7
#: Subspace-iteration rounds (two power steps each) before falling back to a full eigh.
MAX_ROUNDS = 8


@dataclass
class Triplets:
    """Top singular triplets of a batch: ``X[i] ~= sigma[i] * outer(u[i], v[i])``."""

    sigma: torch.Tensor  # (N,)
    u: torch.Tensor  # (N, m), unit norm (zeros when sigma == 0)
    v: torch.Tensor  # (N, n), unit norm (zeros when sigma == 0)

    def to(self, device: torch.device | str) -> Triplets:
        return Triplets(self.sigma.to(device), self.u.to(device), self.v.to(device))

    def scaled(self, factor: torch.Tensor) -> Triplets:
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


def _balancing_scale(gram_l: torch.Tensor, gram_r: torch.Tensor) -> torch.Tensor:
    """Diagonal ``d`` making column ``j`` of ``L d`` and row ``j`` of ``d^-1 R`` equally long.

    Differences of nearby checkpoints mix columns of very different scale; balancing keeps
    the eigen-problems well conditioned (the product ``L R`` is unchanged).
    """
    col = torch.diagonal(gram_l, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    row = torch.diagonal(gram_r, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    live = (col > 0) & (row > 0)
    return torch.where(live, (row / col.clamp_min(1e-300)).sqrt(), torch.ones_like(col))


def balance_grams(gram_l: torch.Tensor, gram_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 Grams of ``(L d, d^-1 R)`` and the scale ``d`` (see :func:`_balancing_scale`)."""
    gram_l, gram_r = gram_l.to(_SMALL), gram_r.to(_SMALL)
    scale = _balancing_scale(gram_l, gram_r)
    outer = scale.unsqueeze(-1) * scale.unsqueeze(-2)
    return gram_l * outer, gram_r / outer, scale


def _omega(k: int, b: int, device: torch.device) -> torch.Tensor:
    """A fixed random start block (the same on every device and run: results are reproducible)."""
    gen = torch.Generator().manual_seed(0x5EED + 131 * k + b)
    return torch.randn(k, b, generator=gen, dtype=_SMALL).to(device)


def _eigh_top(gram_l: torch.Tensor, gram_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct path for the top eigenpair (see :func:`_eigh_topk`)."""
    y, lam = _eigh_topk(gram_l, gram_r, 1)
    return y.squeeze(-1), lam.squeeze(-1)


def _eigh_topk(gram_l: torch.Tensor, gram_r: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct path: top ``count`` eigenpairs of ``Gl Gr`` from one symmetric eigen-decomposition.

    With ``Gl + tau I = C C^T`` (Cholesky, ``tau = 1e-10 max diag``) and ``S = C^T Gr C``,
    ``S z = lambda z`` gives ``Gl Gr (C z) ~= lambda (C z)`` and ``(C z)^T Gr (C z) = lambda``.
    Where Cholesky fails (rounding made a Gram slightly indefinite) ``Gl`` is split by eigh.
    Returns ``y`` ``(..., k, count)`` (``y^T Gr y = I`` on the non-zero pairs) and ``lambda``
    ``(..., count)``, descending.
    """
    k = gram_l.shape[-1]
    tau = 1e-10 * torch.diagonal(gram_l, dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    eye = torch.eye(k, dtype=gram_l.dtype, device=gram_l.device)
    chol, info = torch.linalg.cholesky_ex(gram_l + tau.reshape(-1, 1, 1) * eye)
    bad = info != 0
    if bool(bad.any()):
        w_l, root_l = _psd_factor(gram_l[bad], 1e-12)
        chol = chol.clone()
        chol[bad] = w_l * root_l.unsqueeze(-2)  # Gl = (W root)(W root)^T
    core = chol.mT @ gram_r @ chol
    evals, evecs = torch.linalg.eigh(0.5 * (core + core.mT))
    lam = evals[..., -count:].flip(-1).clamp_min(0)
    y = chol @ evecs[..., -count:].flip(-1)
    scale = torch.where(lam > 0, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    return y * scale.unsqueeze(-2), lam


def _rayleigh_ritz(
    basis: torch.Tensor, gram_l: torch.Tensor, gram_r: torch.Tensor, count: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``count`` Ritz pairs of ``M = Gl Gr`` on ``span(basis)`` in the ``Gr`` inner product.

    Returns ``(y, lambda, M y, M basis)`` with ``y^T Gr y = I``, ``y`` ``(P, k, count)``,
    ``lambda`` ``(P, count)`` descending.
    """
    z = gram_r @ basis  # (P, k, b)
    mb = gram_l @ z  # M basis
    s = basis.mT @ z
    h = z.mT @ mb
    e, w = torch.linalg.eigh(0.5 * (s + s.mT))
    floor = 1e-13 * e[..., -1:].clamp_min(0)
    inv = torch.where(e > floor, e.clamp_min(1e-300).rsqrt(), torch.zeros_like(e))
    t = w * inv.unsqueeze(-2)  # S-whitening, null directions dropped
    core = t.mT @ h @ t
    ev, ec = torch.linalg.eigh(0.5 * (core + core.mT))
    c = t @ ec[..., -count:].flip(-1)
    return basis @ c, ev[..., -count:].flip(-1).clamp_min(0), mb @ c, mb


def top_eigvec(
    gram_l: torch.Tensor, gram_r: torch.Tensor, *, tol: float = RESIDUAL_TOL, max_rounds: int = MAX_ROUNDS, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpair ``(y, lambda)`` of ``Gl @ Gr`` for a batch of PSD ``k x k`` pairs (float64).

    ``y`` is normalised so that ``y^T Gr y = 1`` (zero where ``lambda == 0``); ``lambda`` is
    ``sigma^2`` of the factored matrix whose Grams these are.
    """
    gram_l, gram_r = gram_l.to(_SMALL), gram_r.to(_SMALL)
    batch, k = gram_l.shape[:-2], gram_l.shape[-1]
    gram_l, gram_r = gram_l.reshape(-1, k, k), gram_r.reshape(-1, k, k)
    with single_thread(gram_l.device):
        y, lam = _top_eigvec(gram_l, gram_r, tol, max_rounds, block)
    y = torch.where(lam.unsqueeze(-1) > 0, y, torch.zeros_like(y))
    return y.reshape(*batch, k), lam.reshape(batch)


def _top_eigvec(gram_l: torch.Tensor, gram_r: torch.Tensor, tol: float, max_rounds: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    count, k = gram_l.shape[0], gram_l.shape[-1]
    if k <= block or count == 0:
        return _eigh_top(gram_l, gram_r)
    # sum of sigma^2 (trace of Gl Gr): the scale below which an eigenvalue is zero
    total = (gram_l * gram_r).sum((-2, -1)).clamp_min(0)
    y_out = torch.zeros(count, k, dtype=_SMALL, device=gram_l.device)
    lam_out = torch.zeros(count, dtype=_SMALL, device=gram_l.device)
    live = torch.arange(count, device=gram_l.device)
    gl, gr = gram_l, gram_r
    basis = gl @ (gr @ _omega(k, block, gl.device))
    for _round in range(max_rounds):
        basis = gl @ (gr @ basis)  # one extra power step per Rayleigh-Ritz
        basis = torch.linalg.qr(basis / basis.norm(dim=-2, keepdim=True).clamp_min(1e-300)).Q
        y, lam, my, basis = _rayleigh_ritz(basis, gl, gr)  # M basis is the next power step
        y, lam, my = y.squeeze(-1), lam.squeeze(-1), my.squeeze(-1)
        resid = my - lam.unsqueeze(-1) * y
        rho = (resid.unsqueeze(-2) @ (gr @ resid.unsqueeze(-1))).reshape(-1).clamp_min(0).sqrt()
        ref = total[live]
        done = (rho <= tol * lam) | (lam <= 1e-24 * ref) | (ref == 0)
        if bool(done.any()):
            idx = live[done]
            y_out[idx], lam_out[idx] = y[done], lam[done]
            keep = ~done
            live, gl, gr, basis = live[keep], gl[keep], gr[keep], basis[keep]
            if live.numel() == 0:
                break
    if live.numel():
        y_out[live], lam_out[live] = _eigh_top(gl, gr)
    return y_out, lam_out


def top_eigvecs(
    gram_l: torch.Tensor,
    gram_r: torch.Tensor,
    count: int,
    *,
    start: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
    tol: float = 1e-12,
    max_rounds: int = 12,
    oversample: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``count`` eigenpairs ``(Y, lambda)`` of ``Gl @ Gr`` for a batch of PSD ``k x k`` pairs (float64).

    ``Y`` ``(N, k, count)`` satisfies ``Y^T Gr Y = I`` (zero columns where ``lambda == 0``);
    ``lambda`` ``(N, count)`` are the ``sigma^2`` of the factored matrix, descending. Small
    problems use one eigen-decomposition; large ones block subspace iteration from ``start``
    (``(N, k, c)``, a guess of the top subspace, plus random columns), stopped when the energy
    ``sum(lambda)`` moves by less than ``tol`` times the total ``trace(Gl Gr)`` between rounds
    (the re-factoring needs the best rank-``count`` energy, not each vector to full accuracy);
    members still moving after ``max_rounds`` fall back to the eigen-decomposition. ``total``
    (``(N,)``), when the caller knows it, saves one pass over the Grams.
    """
    gl, gr = gram_l.to(_SMALL), gram_r.to(_SMALL)
    count_all, k = gl.shape[0], gl.shape[-1]
    width = min(k, count + oversample)
    if 2 * width >= k or count_all == 0:
        return _eigh_topk(gl, gr, count)
    guess = torch.zeros(count_all, k, 0, dtype=_SMALL, device=gl.device) if start is None else start.to(_SMALL)
    extra = _omega(k, width - guess.shape[-1], gl.device).expand(count_all, -1, -1)
    basis = torch.cat([guess, extra], dim=-1)
    total = (gl * gr).sum((-2, -1)).clamp_min(0) if total is None else total.to(_SMALL)
    y_out = torch.zeros(count_all, k, count, dtype=_SMALL, device=gl.device)
    lam_out = torch.zeros(count_all, count, dtype=_SMALL, device=gl.device)
    live = torch.arange(count_all, device=gl.device)
    previous = torch.full((count_all,), float("nan"), dtype=_SMALL, device=gl.device)
    for _round in range(max_rounds):
        basis = torch.linalg.qr(basis / basis.norm(dim=-2, keepdim=True).clamp_min(1e-300)).Q
        y, lam, _my, basis = _rayleigh_ritz(basis, gl, gr, width)  # M basis is the next power step
        energy = lam[:, :count].sum(-1)
        ref = total[live]
        done = ((energy - previous).abs() <= tol * ref) | (ref == 0)
        previous = energy
        if bool(done.any()):
            idx = live[done]
            y_out[idx], lam_out[idx] = y[done][..., :count], lam[done][:, :count]
            keep = ~done
            live, gl, gr, basis, previous = live[keep], gl[keep], gr[keep], basis[keep], previous[keep]
            if live.numel() == 0:
                break
    if live.numel():
        y_out[live], lam_out[live] = _eigh_topk(gl, gr, count)
    y_out = torch.where(lam_out.unsqueeze(-2) > 0, y_out, torch.zeros_like(y_out))
    return y_out, lam_out


def solve_balanced(gram_l: torch.Tensor, gram_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(c, w)`` with ``v ~ R^T c`` and ``u ~ L w = X R^T c`` from unbalanced Grams.

    Both are float64 ``(..., k)``; they are zero where the product is zero.
    """
    gl, gr, scale = balance_grams(gram_l, gram_r)
    y, _lam = top_eigvec(gl, gr)
    w = scale * (gr @ y.unsqueeze(-1)).squeeze(-1)
    return y / scale, w


def row_times(coef: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """``coef^T @ mat`` per batch item: ``(..., k)`` x ``(..., k, n)`` -> ``(..., n)``.

    Written as a row vector times a row-major matrix: one streaming pass (a batched
    ``mat^T @ coef`` runs several times slower on CPU).
    """
    return (coef.to(mat.dtype).unsqueeze(-2) @ mat).squeeze(-2)


def mat_times(mat: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``mat @ coef`` per batch item: ``(..., m, k)`` x ``(..., k)`` -> ``(..., m)``.

    On CPU one ``mv`` per item (about twice the bandwidth of a batched matmul with one column).
    """
    coef = coef.to(mat.dtype)
    if mat.device.type != "cpu":
        return (mat @ coef.unsqueeze(-1)).squeeze(-1)
    batch, (m, k) = mat.shape[:-2], mat.shape[-2:]
    flat_m, flat_c = mat.reshape(-1, m, k), coef.reshape(-1, k)
    out = torch.empty(flat_m.shape[0], m, dtype=mat.dtype)
    for i in range(flat_m.shape[0]):
        torch.mv(flat_m[i], flat_c[i], out=out[i])
    return out.reshape(*batch, m)


def lift(left: torch.Tensor, right: torch.Tensor, coef_v: torch.Tensor, coef_u: torch.Tensor) -> Triplets:
    """``v = R^T c / |.|``, ``u = L w / |.|``, ``sigma = |L w| / |R^T c|`` (zeros where either is 0)."""
    return normalised(mat_times(left, coef_u), row_times(coef_v, right))


def normalised(u: torch.Tensor, v: torch.Tensor) -> Triplets:
    """Triplet from unnormalised ``u = X v`` and ``v``."""
    v_norm, u_norm = v.norm(dim=-1), u.norm(dim=-1)
    live = (v_norm > 0) & (u_norm > 0)
    tiny = torch.finfo(v.dtype).tiny
    sigma = torch.where(live, u_norm / v_norm.clamp_min(tiny), torch.zeros_like(u_norm))
    v = torch.where(live.unsqueeze(-1), v / v_norm.clamp_min(tiny).unsqueeze(-1), torch.zeros_like(v))
    u = torch.where(live.unsqueeze(-1), u / u_norm.clamp_min(tiny).unsqueeze(-1), torch.zeros_like(u))
    return Triplets(sigma=sigma, u=u, v=v)


def stacked_gram(stacked: torch.Tensor, *, block: int = 256) -> torch.Tensor:
    """``X X^T`` of a batch of wide matrices ``X`` ``(N, p, n)``, computing only its upper half.

    Rows are taken ``block`` at a time against the rows from there on, and the lower half is
    mirrored (about 1.5x faster than one full GEMM for ``p = 1024`` on CPU; exactly symmetric).
    For ``X^T X`` of a tall ``Y`` pass ``Y.mT`` (a view).
    """
    p = stacked.shape[-2]
    out = torch.empty(*stacked.shape[:-2], p, p, dtype=stacked.dtype, device=stacked.device)
    for start in range(0, p, block):
        stop = min(start + block, p)
        piece = stacked[..., start:stop, :] @ stacked[..., start:, :].mT
        out[..., start:stop, start:] = piece
        out[..., stop:, start:stop] = piece[..., :, stop - start :].mT
    return out


def symmetric_blocks(top_left: torch.Tensor, top_right: torch.Tensor, bottom_right: torch.Tensor) -> torch.Tensor:
    """The symmetric float64 matrix ``[[TL, TR], [TR^T, BR]]`` (batched), written into one buffer."""
    k, p = top_left.shape[-1], bottom_right.shape[-1]
    out = torch.empty(*top_left.shape[:-2], k + p, k + p, dtype=_SMALL, device=top_left.device)
    out[..., :k, :k] = top_left
    out[..., :k, k:] = top_right
    out[..., k:, :k] = top_right.mT
    out[..., k:, k:] = bottom_right
    return out


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
        rel_tol: kept for compatibility; the solver never inverts a Gram, so rank-deficient
            factors need no threshold (the fallback eigen path floors at ``1e-12``).

    Returns:
        Triplets with ``sigma >= 0``; all-zero ``u``/``v`` where the product is zero.
    """
    del rel_tol
    gram_l = gram_left(left) if gram_l is None else gram_l
    gram_r = gram_right(right) if gram_r is None else gram_r
    coef_v, coef_u = solve_balanced(gram_l, gram_r)
    return lift(left, right, coef_v, coef_u)


def difference_factors(b1: torch.Tensor, a1: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
