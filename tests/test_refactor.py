"""Re-factoring a predicted update to rank r, checked against a dense SVD oracle."""

from __future__ import annotations

import pytest
import torch

from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.decompose import top_eigvecs
from nextoffline.ops.predictors.base import FactoredUpdate
from nextoffline.ops.predictors.trajectory import WindowUpdate, window_grams
from nextoffline.ops.refactor import refactor_grow_rank, refactor_keep_rank


def _case(seed: int, n_mod: int, m: int, n: int, r: int, p: int, update_scale: float):
    gen = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, r, dtype=torch.float64)  # a LoRA update with a decaying spectrum
    b = torch.randn(n_mod, m, r, generator=gen, dtype=torch.float64) * decay
    a = torch.randn(n_mod, r, n, generator=gen, dtype=torch.float64) / n**0.5
    scaling = torch.full((n_mod,), 2.0, dtype=torch.float64)
    left = torch.randn(n_mod, m, p, generator=gen, dtype=torch.float64) * update_scale
    right = torch.randn(n_mod, p, n, generator=gen, dtype=torch.float64) / n**0.5
    return b, a, scaling, FactoredUpdate(left, right)


def _oracle(b, a, scaling, update, r):
    dense = scaling.reshape(-1, 1, 1) * b @ a + update.left @ update.right
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = u[..., :r] * s[..., None, :r] @ vh[..., :r, :]
    return dense, best, s


@pytest.mark.parametrize("p", [1, 6, 40])  # p = 40: subspace iteration (r + p > 2 (r + 8))
def test_keep_rank_is_the_best_rank_r_approximation(p: int) -> None:
    r = 8
    b, a, scaling, update = _case(p, n_mod=3, m=70, n=50, r=r, p=p, update_scale=0.05)
    _dense, best, sv = _oracle(b, a, scaling, update, r)
    result = refactor_keep_rank(b, a, scaling, update)
    ours = scaling.reshape(-1, 1, 1) * result.b @ result.a
    assert result.b.shape == b.shape and result.a.shape == a.shape
    assert torch.linalg.matrix_norm(ours - best).max() <= 1e-6 * torch.linalg.matrix_norm(best).min()
    update_sq = torch.linalg.matrix_norm(update.left @ update.right).square()
    expected_kept = 1 - sv[..., r:].square().sum(-1) / update_sq
    assert torch.allclose(result.kept_energy, expected_kept.clamp(0, 1), atol=1e-6)


def test_keep_rank_stays_in_the_gauge_of_the_latest_a() -> None:
    r = 8
    b, a, scaling, update = _case(1, n_mod=2, m=60, n=40, r=r, p=3, update_scale=1e-4)
    result = refactor_keep_rank(b, a, scaling, update)
    assert not bool(result.gauge_reset.any())
    assert torch.linalg.matrix_norm(result.a - a).max() <= 1e-2 * torch.linalg.matrix_norm(a).min()


def test_keep_rank_zero_update_returns_the_latest_factors_exactly() -> None:
    b, a, scaling, update = _case(2, n_mod=2, m=30, n=20, r=4, p=12, update_scale=0.0)
    result = refactor_keep_rank(b.float(), a.float(), scaling.float(), FactoredUpdate(update.left.float(), update.right.float()))
    assert torch.equal(result.b, b.float()) and torch.equal(result.a, a.float())
    assert torch.equal(result.kept_energy, torch.ones(2, dtype=torch.float64))


def test_keep_rank_uses_grams_passed_by_the_predictor() -> None:
    b, a, scaling, update = _case(3, n_mod=2, m=50, n=40, r=6, p=30, update_scale=0.1)
    plain = refactor_keep_rank(b, a, scaling, update)
    gram_left, gram_right = update.grams()
    reused = refactor_keep_rank(b, a, scaling, FactoredUpdate(update.left, update.right, gram_left, gram_right))
    assert torch.allclose(plain.b @ plain.a, reused.b @ reused.a, atol=1e-10)
    wrong = FactoredUpdate(update.left, update.right, 4 * gram_left, gram_right)
    assert not torch.allclose(refactor_keep_rank(b, a, scaling, wrong).kept_energy, plain.kept_energy)


def test_window_update_works_block_by_block_like_its_stacked_factors() -> None:
    """The RELEX update never stacks its factors; every operation matches the stacked form."""
    gen = torch.Generator().manual_seed(5)
    k, n_mod, m, n, r = 5, 3, 40, 30, 4
    chunk = FactorChunk(
        [f"m{i}" for i in range(n_mod)],
        torch.arange(k, dtype=torch.float64),
        torch.randn(k, n_mod, m, r, generator=gen, dtype=torch.float64),
        torch.randn(k, n_mod, r, n, generator=gen, dtype=torch.float64),
        torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64),
    )
    weights = torch.randn(n_mod, k, generator=gen, dtype=torch.float64)
    structured = WindowUpdate(chunk, weights, window_grams(chunk))
    stacked = FactoredUpdate(structured.left, structured.right)
    dense = sum(weights[:, i, None, None] * chunk.scaling[:, None, None] * chunk.b[i] @ chunk.a[i] for i in range(k))
    assert torch.allclose(stacked.left @ stacked.right, dense)
    for ours, theirs in zip(structured.grams(), stacked.grams()):
        assert torch.allclose(ours, theirs)
    sb = chunk.scaling[:, None, None] * chunk.b[-1]
    for ours, theirs in zip(structured.cross(sb, chunk.a[-1]), stacked.cross(sb, chunk.a[-1])):
        assert torch.allclose(ours, theirs)
    coef = torch.randn(n_mod, k * r, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(structured.left_times(coef), stacked.left_times(coef))
    assert torch.allclose(structured.times_right(coef.mT), stacked.times_right(coef.mT))
    assert torch.allclose(structured.frobenius_sq(), stacked.frobenius_sq())
    result = refactor_keep_rank(chunk.b[-1], chunk.a[-1], chunk.scaling, structured)
    expected = refactor_keep_rank(chunk.b[-1], chunk.a[-1], chunk.scaling, stacked)
    assert torch.allclose(result.b @ result.a, expected.b @ expected.a, atol=1e-9)
    assert torch.allclose(result.kept_energy, expected.kept_energy, atol=1e-9)


def test_window_update_folds_the_latest_factors_into_the_window() -> None:
    """``s B A + D`` re-uses the window's blocks (width W r) when B, A are the window's last."""
    gen = torch.Generator().manual_seed(6)
    k, n_mod, m, n, r = 4, 2, 30, 20, 3
    chunk = FactorChunk(
        ["x", "y"],
        torch.arange(k, dtype=torch.float64),
        torch.randn(k, n_mod, m, r, generator=gen, dtype=torch.float64),
        torch.randn(k, n_mod, r, n, generator=gen, dtype=torch.float64),
        torch.tensor([2.0, 0.5], dtype=torch.float64),
    )
    update = WindowUpdate(chunk, torch.randn(n_mod, k, generator=gen, dtype=torch.float64), window_grams(chunk))
    total, latest = update.plus_latest(chunk.b[-1], chunk.a[-1], chunk.scaling)
    assert isinstance(total, WindowUpdate) and latest == slice((k - 1) * r, k * r)
    latest_dense = chunk.scaling[:, None, None] * chunk.b[-1] @ chunk.a[-1]
    assert torch.allclose(total.left @ total.right, latest_dense + update.left @ update.right)
    assert torch.allclose(total.right[:, latest], chunk.a[-1])
    other_b = chunk.b[-1] + 1.0  # not the window's latest factors: the generic stacked form
    total, latest = update.plus_latest(other_b, chunk.a[-1], chunk.scaling)
    assert not isinstance(total, WindowUpdate) and latest == slice(0, r)
    other_dense = chunk.scaling[:, None, None] * other_b @ chunk.a[-1]
    assert torch.allclose(total.left @ total.right, other_dense + update.left @ update.right)


def test_grow_rank_is_exact() -> None:
    b, a, scaling, update = _case(4, n_mod=2, m=30, n=20, r=4, p=1, update_scale=0.3)
    dense, _best, _sv = _oracle(b, a, scaling, update, 4)
    result = refactor_grow_rank(b, a, scaling, update)
    assert result.b.shape[-1] == 5
    assert torch.allclose(scaling.reshape(-1, 1, 1) * result.b @ result.a, dense, atol=1e-12)


@pytest.mark.parametrize("k,count", [(12, 3), (80, 5)])
def test_top_eigvecs_match_the_dense_svd(k: int, count: int) -> None:
    gen = torch.Generator().manual_seed(k)
    left = torch.randn(4, 90, k, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, k, dtype=torch.float64)
    right = torch.randn(4, k, 70, generator=gen, dtype=torch.float64)
    y, lam = top_eigvecs(left.mT @ left, right @ right.mT, count)
    sv = torch.linalg.svdvals(left @ right)
    assert torch.allclose(lam.sqrt(), sv[..., :count], rtol=1e-8)
    v = right.mT @ y  # right singular vectors: orthonormal
    assert torch.allclose(v.mT @ v, torch.eye(count, dtype=torch.float64).expand(4, -1, -1), atol=1e-8)
