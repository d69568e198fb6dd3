"""Factored rank-1 decomposition checked against dense ``torch.linalg.svd``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nextoffline.ops.chunk import FactorChunk, rank1_features
from nextoffline.ops.decompose import align_signs, difference_factors, frobenius_sq, inner_product, top_triplet
from nextoffline.trajectory import module_scaling

SIGMA_RTOL = 1e-4
MIN_COS = 0.9999


def assert_matches_dense(left: torch.Tensor, right: torch.Tensor) -> None:
    got = top_triplet(left, right)
    dense = left.double() @ right.double()
    u, s, vh = torch.linalg.svd(dense)
    for i in range(dense.shape[0]):
        if s[i, 0] == 0:
            assert got.sigma[i] == 0
            continue
        assert abs(float(got.sigma[i]) - float(s[i, 0])) <= SIGMA_RTOL * float(s[i, 0])
        assert abs(float(got.u[i].double() @ u[i, :, 0])) >= MIN_COS
        assert abs(float(got.v[i].double() @ vh[i, 0])) >= MIN_COS


@pytest.mark.parametrize("m,n,k", [(40, 70, 4), (70, 40, 4), (64, 64, 1), (300, 50, 16), (17, 129, 8), (8, 8, 8)])
def test_top_triplet_matches_dense_svd(m: int, n: int, k: int) -> None:
    assert_matches_dense(torch.randn(3, m, k), torch.randn(3, k, n))


def test_rank_deficient_factors() -> None:
    b = torch.randn(4, 50, 2) @ torch.randn(4, 2, 6)  # rank 2 inside r = 6
    assert_matches_dense(b, torch.randn(4, 6, 30))


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-5])
def test_difference_of_nearby_checkpoints(eps: float) -> None:
    b0, a0 = torch.randn(3, 64, 8), torch.randn(3, 8, 48)
    b1, a1 = b0 + eps * torch.randn_like(b0), a0 + eps * torch.randn_like(a0)
    assert_matches_dense(*difference_factors(b1, a1, b0, a0))


def test_lora_like_scales() -> None:
    b = 1e-3 * torch.randn(2, 200, 8)
    a = torch.randn(2, 8, 96) / 10
    assert_matches_dense(b, a)


def test_zero_and_identical_give_sigma_zero_never_nan() -> None:
    zero = top_triplet(torch.zeros(2, 10, 3), torch.randn(2, 3, 5))
    assert torch.equal(zero.sigma, torch.zeros(2)) and not torch.isnan(zero.u).any() and not torch.isnan(zero.v).any()
    b, a = torch.randn(2, 10, 3), torch.randn(2, 3, 5)
    same = top_triplet(*difference_factors(b, a, b, a))
    assert torch.equal(same.sigma, torch.zeros(2)) and torch.isfinite(same.u).all()


def test_fan_in_fan_out_swaps_u_and_v() -> None:
    """PEFT stores dW^T for fan_in_fan_out layers: its triplet is ours with u and v swapped."""
    b, a = torch.randn(1, 30, 4), torch.randn(1, 4, 20)
    ours = top_triplet(b, a)
    u, s, vh = torch.linalg.svd((b[0] @ a[0]).T.double())
    assert abs(float(ours.sigma[0]) - float(s[0])) <= SIGMA_RTOL * float(s[0])
    assert abs(float(ours.v[0].double() @ u[:, 0])) >= MIN_COS
    assert abs(float(ours.u[0].double() @ vh[0])) >= MIN_COS


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_with_rslora_and_patterns(rslora: bool) -> None:
    config = {"r": 8, "lora_alpha": 16, "use_rslora": rslora, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.1.q_proj": 2}}
    assert module_scaling(config, "base_model.model.model.layers.0.mlp.up_proj") == (8, 16 / (math.sqrt(8) if rslora else 8))
    assert module_scaling(config, "base_model.model.model.layers.0.self_attn.q_proj") == (4, 16 / (2 if rslora else 4))
    assert module_scaling(config, "base_model.model.model.layers.1.q_proj") == (4, 2 / (2 if rslora else 4))


def test_scaled_triplet_matches_dense_with_scaling() -> None:
    b, a, s = torch.randn(2, 24, 4), torch.randn(2, 4, 16), torch.tensor([0.5, 4.0])
    assert_matches_dense(s[:, None, None] * b, a)


def test_frobenius_and_inner_product() -> None:
    l1, r1, l2, r2 = torch.randn(2, 20, 3), torch.randn(2, 3, 15), torch.randn(2, 20, 5), torch.randn(2, 5, 15)
    x1, x2 = (l1 @ r1).double(), (l2 @ r2).double()
    torch.testing.assert_close(inner_product(l1, r1, l2, r2), (x1 * x2).sum((-2, -1)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(frobenius_sq(l1, r1), x1.square().sum((-2, -1)), rtol=1e-5, atol=1e-4)


def test_sign_alignment_makes_trajectories_smooth() -> None:
    base_b, base_a = torch.randn(1, 30, 2), torch.randn(1, 2, 20)
    seq = [top_triplet(base_b * (1 + 0.05 * t), base_a) for t in range(5)]
    for i, item in enumerate(seq):  # scramble signs
        if i % 2:
            item.u.neg_()
            item.v.neg_()
    aligned = align_signs(seq)
    for prev, cur in itertools.pairwise(aligned):
        assert float(prev.u[0] @ cur.u[0]) > 0.99 and float(prev.v[0] @ cur.v[0]) > 0.99


def test_rank1_features_match_dense_deltas() -> None:
    k, n_mod, m, r, n = 5, 2, 24, 3, 18
    b = torch.randn(k, n_mod, m, r).cumsum(0)
    a = torch.randn(1, n_mod, r, n) + 0.1 * torch.randn(k, n_mod, r, n)
    chunk = FactorChunk(["x", "y"], torch.arange(k, dtype=torch.float64) * 10, b, a, torch.tensor([2.0, 0.5]))
    feats = rank1_features(chunk, horizon=2)
    dense = chunk.scaling[None, :, None, None].double() * (b.double() @ a.double())
    for t in range(k):
        assert torch.allclose(feats.global_[t].sigma.double(), torch.linalg.matrix_norm(dense[t], ord=2), rtol=1e-4)
    for t in range(1, k):
        assert torch.allclose(feats.local[t].sigma.double(), torch.linalg.matrix_norm(dense[t] - dense[t - 1], ord=2), rtol=1e-4)
    assert feats.local[0] is None and feats.target[k - 1] is None and feats.target[k - 2] is None
    for t in range(k):  # Frobenius energies from the same Grams
        assert torch.allclose(feats.global_energy[t], dense[t].square().sum((-2, -1)), rtol=1e-5)
    assert feats.local_energy[0] is None
    for t in range(1, k):
        assert torch.allclose(feats.local_energy[t], (dense[t] - dense[t - 1]).square().sum((-2, -1)), rtol=1e-4)
    assert torch.allclose(feats.target[0].sigma.double(), torch.linalg.matrix_norm(dense[2] - dense[0], ord=2), rtol=1e-4)
