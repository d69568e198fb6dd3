"""CPU/GPU parity of the decomposition, the loader and a whole extrapolation (``-m gpu``).

Skipped where CUDA is not available. To check the test code itself on a CPU-only machine,
``NEXTOFFLINE_GPU_TEST_DEVICE=cpu pytest tests/test_gpu.py`` runs every test with the "GPU"
side on the CPU (a self-parity run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nextoffline.ops.chunk import FactorChunk, rank1_features
from nextoffline.ops.decompose import Triplets, difference_factors, top_triplet

_OVERRIDE = os.environ.get("NEXTOFFLINE_GPU_TEST_DEVICE")
DEVICE = torch.device(_OVERRIDE) if _OVERRIDE else torch.device("cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIGMA_RTOL = 1e-4
MIN_COS = 0.9999


def assert_same_triplets(cpu: Triplets, gpu: Triplets, *, signed: bool = False) -> None:
    gpu = gpu.to("cpu")
    sigma_c, sigma_g = cpu.sigma.double(), gpu.sigma.double()
    assert torch.all((sigma_c - sigma_g).abs() <= SIGMA_RTOL * sigma_c.abs().clamp_min(1e-30)), (sigma_c, sigma_g)
    live = sigma_c > 0
    cos_u = (cpu.u.double() * gpu.u.double()).sum(-1)
    cos_v = (cpu.v.double() * gpu.v.double()).sum(-1)
    if not signed:
        cos_u, cos_v = cos_u.abs(), cos_v.abs()
    assert torch.all(cos_u[live] >= MIN_COS) and torch.all(cos_v[live] >= MIN_COS), (cos_u, cos_v)


@pytest.mark.parametrize("m,n,k", [(64, 48, 4), (300, 200, 16), (512, 3584, 64), (3584, 512, 128)])
def test_top_triplet_parity(m: int, n: int, k: int) -> None:
    left, right = torch.randn(3, m, k), torch.randn(3, k, n)
    cpu = top_triplet(left, right)
    gpu = top_triplet(left.to(DEVICE), right.to(DEVICE))
    assert gpu.u.device.type == DEVICE.type
    assert_same_triplets(cpu, gpu)
    _u, s, _vh = torch.linalg.svd(left.double() @ right.double())
    assert torch.allclose(gpu.sigma.cpu().double(), s[:, 0], rtol=SIGMA_RTOL)


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-5])
def test_top_triplet_parity_on_nearby_checkpoints(eps: float) -> None:
    b0, a0 = 1e-3 * torch.randn(4, 256, 16), torch.randn(4, 16, 192) / 14
    b1, a1 = b0 + eps * 1e-3 * torch.randn_like(b0), a0 + eps / 14 * torch.randn_like(a0)
    left, right = difference_factors(b1, a1, b0, a0)
    cpu = top_triplet(left, right)
    gpu = top_triplet(left.to(DEVICE), right.to(DEVICE))
    assert_same_triplets(cpu, gpu)


def _chunk(k: int = 7, n_mod: int = 3, m: int = 96, n: int = 80, r: int = 8) -> FactorChunk:
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(n_mod, m, r, generator=gen)
    b = torch.stack([(t + 1) * direction + 0.3 * torch.randn(n_mod, m, r, generator=gen) for t in range(k)]) * 1e-3
    a = torch.randn(1, n_mod, r, n, generator=gen) / 9 + 1e-3 * torch.randn(k, n_mod, r, n, generator=gen).cumsum(0)
    return FactorChunk([f"m{i}" for i in range(n_mod)], torch.arange(k, dtype=torch.float64) * 10, b, a, torch.tensor([2.0, 0.5, 1.0]))


def _to(chunk: FactorChunk, device: torch.device) -> FactorChunk:
    return FactorChunk(chunk.names, chunk.steps, chunk.b.to(device), chunk.a.to(device), chunk.scaling.to(device))


@pytest.mark.parametrize("lag", [1, 2])
def test_rank1_features_parity(lag: int) -> None:
    chunk = _chunk()
    cpu = rank1_features(chunk, horizon=2, lag=lag)
    gpu = rank1_features(_to(chunk, DEVICE), horizon=2, lag=lag)
    assert gpu.global_[0].u.device.type == DEVICE.type
    for seq_c, seq_g in ((cpu.global_, gpu.global_), (cpu.local, gpu.local), (cpu.target, gpu.target)):
        assert [x is None for x in seq_c] == [x is None for x in seq_g]
        pairs = [(c, g) for c, g in zip(seq_c, seq_g) if c is not None]
        # sequences are sign-aligned: after fixing the first sign, every later sign must agree too
        flip = torch.where((pairs[0][0].u * pairs[0][1].u.cpu()).sum(-1) < 0, -1.0, 1.0).unsqueeze(-1)
        for c, g in pairs:
            assert_same_triplets(c, Triplets(g.sigma, g.u * flip.to(g.u), g.v * flip.to(g.v)), signed=True)


def test_loader_moves_exact_values(tmp_path: Path) -> None:
    from nextoffline.loader import iter_chunks
    from nextoffline.synthetic import SyntheticSpec, write_synthetic_trajectory
    from nextoffline.trajectory import load_trajectory

    write_synthetic_trajectory(tmp_path / "run", SyntheticSpec(steps=[10, 20, 30, 40, 50], noise=0.1, dtype=torch.bfloat16))
    trajectory = load_trajectory(tmp_path / "run")
    cpu = [(p.names, c.b.clone(), c.a.clone()) for p, c in iter_chunks(trajectory, torch.device("cpu"))]
    gpu = [(p.names, c.b, c.a) for p, c in iter_chunks(trajectory, DEVICE, budget_bytes=4096)]
    by_name_cpu = {name: (b[:, i], a[:, i]) for names, b, a in cpu for i, name in enumerate(names)}
    assert sum(len(names) for names, _b, _a in gpu) == len(by_name_cpu)
    for names, b, a in gpu:
        assert b.device.type == DEVICE.type and b.dtype == torch.float32
        for i, name in enumerate(names):
            assert torch.equal(b[:, i].cpu(), by_name_cpu[name][0]) and torch.equal(a[:, i].cpu(), by_name_cpu[name][1])


@pytest.mark.parametrize("method,rtol", [("linear", 1e-4), ("next", 2e-2)])
def test_extrapolate_parity(tmp_path: Path, method: str, rtol: float) -> None:
    from nextoffline.pipeline import NextOptions, PredictorOptions, RunSettings, extrapolate
    from nextoffline.synthetic import SyntheticSpec, write_synthetic_trajectory
    from nextoffline.trajectory import load_trajectory

    spec = SyntheticSpec(steps=list(range(10, 90, 10)), law="sqrt", noise=0.01, a_drift=0.05)
    write_synthetic_trajectory(tmp_path / "run", spec)
    trajectory = load_trajectory(tmp_path / "run")
    options = PredictorOptions(next=NextOptions(epochs=30))
    results = {}
    for device in (torch.device("cpu"), DEVICE):
        settings = RunSettings(device=device, progress=False, predictors=options)
        results[device.type if device.type != "cpu" or not results else "cpu-ref"] = extrapolate(
            trajectory, settings, method=method, coefs=[1.0]
        )
    ref, other = results["cpu-ref"], results[next(k for k in results if k != "cpu-ref")]
    scaling = spec.alpha / spec.rank
    num = den = 0.0
    for module in trajectory.modules:
        dense = [
            scaling * r.candidates[0].tensors[module.b_key].double() @ r.candidates[0].tensors[module.a_key].double() for r in (ref, other)
        ]
        num += float((dense[0] - dense[1]).square().sum())
        den += float(dense[0].square().sum())
        assert other.candidates[0].tensors[module.b_key].device.type == "cpu"  # outputs come back to the CPU
    assert (num / den) ** 0.5 <= rtol
    assert abs(ref.candidates[0].kept_energy_mean - other.candidates[0].kept_energy_mean) <= 1e-3
