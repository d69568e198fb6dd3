"""A batch of same-shape LoRA modules over all saved steps, in compute dtype on the compute device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch

from nextoffline.ops.decompose import (
    Triplets,
    align_signs,
    align_to,
    difference_factors,
    mat_times,
    normalised,
    row_times,
    solve_balanced,
    symmetric_blocks,
)

__all__ = ["ChunkCache", "FactorChunk", "Rank1Features", "aligned_features", "contiguous_index", "rank1_features"]

_Slot = TypeVar("_Slot")


class ChunkCache:
    """Derived data of one chunk as read, shared by every chunk selected from it.

    One slot per owner class: a predictor module defines a class for what it derives (e.g. the
    trajectory predictors' window Grams) and ``cache.get(ThatClass)`` returns the one instance
    for this chunk, built by ``ThatClass()`` on first use. The owner alone reads and writes it.
    """

    def __init__(self) -> None:
        self._slots: dict[type, object] = {}

    def get(self, owner: type[_Slot]) -> _Slot:
        if owner not in self._slots:
            self._slots[owner] = owner()
        return cast(_Slot, self._slots[owner])


@dataclass
class FactorChunk:
    """Factors of ``N`` modules of identical shape at ``K`` steps.

    Attributes:
        names: module names, length ``N``.
        steps: ``(K,)`` float64 training steps, increasing.
        b: ``(K, N, m, r)`` LoRA B factors.
        a: ``(K, N, r, n)`` LoRA A factors.
        scaling: ``(N,)`` LoRA scalings (``alpha / r`` or ``alpha / sqrt(r)``).
        origin: indices of these steps in the chunk they were selected from (``None``: the
            chunk as read, its steps are its own).
        cache: derived data (e.g. window Grams over every step) shared by all the chunks
            selected from the same read chunk, so that several predictors compute it once.
    """

    names: list[str]
    steps: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor
    scaling: torch.Tensor
    origin: tuple[int, ...] | None = None
    cache: ChunkCache = field(default_factory=ChunkCache, repr=False, compare=False)

    @property
    def num_steps(self) -> int:
        return int(self.steps.shape[0])

    def update(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(s B_t, A_t)`` of the effective update ``dW_t`` (the global delta for LoRA)."""
        return self.scaling.to(self.b)[:, None, None] * self.b[t], self.a[t]

    def delta(self, t1: int, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of ``dW_t1 - dW_t0`` written without cancellation."""
        left, right = difference_factors(self.b[t1], self.a[t1], self.b[t0], self.a[t0])
        return self.scaling.to(left)[:, None, None] * left, right

    def select_steps(self, index: list[int]) -> FactorChunk:
        """The same modules at a subset of steps (a prefix for backtests, a window for fits)."""
        index = list(index)
        at = contiguous_index(index)  # a view (no copy) for a contiguous run of steps
        origin = tuple(self.step_origin[i] for i in index)
        return FactorChunk(self.names, self.steps[at], self.b[at], self.a[at], self.scaling, origin=origin, cache=self.cache)

    def select_modules(self, index: list[int]) -> FactorChunk:
        """Some of the modules at every step (a new chunk: nothing derived is shared)."""
        return FactorChunk([self.names[i] for i in index], self.steps, self.b[:, index], self.a[:, index], self.scaling[index])

    @property
    def step_origin(self) -> tuple[int, ...]:
        """Indices of this chunk's steps in the chunk as read."""
        return self.origin if self.origin is not None else tuple(range(self.num_steps))


@dataclass
class Rank1Features:
    """Sign-aligned rank-1 triplets along a trajectory (NExt inputs and targets).

    ``global_[t]`` decomposes ``dW_t``; ``local[t]`` decomposes ``dW_t - dW_{t-lag}``
    (``None`` for ``t < lag``); ``target[t]`` decomposes ``dW_{t+h} - dW_t`` (``None`` where
    ``t + h`` is past the end). ``global_energy``/``local_energy`` are the squared Frobenius
    norms ``(N,)`` (float64) of the same deltas, from the Grams the triplets were solved from.
    """

    global_: list[Triplets]
    local: list[Triplets | None]
    target: list[Triplets | None]
    global_energy: list[torch.Tensor]
    local_energy: list[torch.Tensor | None]


def rank1_features(chunk: FactorChunk, *, horizon: int, lag: int = 1) -> Rank1Features:
    """Global, local and target rank-1 triplets for every step of ``chunk``.

    Each sequence is sign-aligned along the steps; each target is first aligned to the local
    delta of its step (the most recent movement), so the learning problem is consistent.

    Cost: the Gram blocks of every delta are built from the pieces they share. A delta
    ``dW_t1 - dW_t0 = s [D, B_t0] @ [A_t1; F]`` (``D = B_t1 - B_t0``, ``F = A_t1 - A_t0``) needs
    only ``D^T [D, B_t0]`` and ``F [F; A_t0]^T`` besides the global Grams ``B^T B``, ``A A^T``
    of its two steps, and with ``lag == 1`` the global Grams follow from the same blocks
    (``B_t^T B_t = B_t0^T B_t0 + D^T B_t0 + B_t0^T D + D^T D``). So every step costs about two
    ``(m + n) r^2`` GEMMs for its global and local triplets, plus two per target.
    """
    k = chunk.num_steps
    grams = _GlobalGrams(chunk)
    grams.compute([0] if lag == 1 else list(range(k)))
    scratch = _Scratch(chunk)
    local_seq: list[Triplets] = []
    local_energy: list[torch.Tensor | None] = [None] * lag
    for start in range(lag, k, _PAIR_BATCH):
        t1 = list(range(start, min(start + _PAIR_BATCH, k)))
        triplets, energies = _pair_triplets(chunk, grams, t1, [t - lag for t in t1], scratch, derive_globals=lag == 1)
        local_seq.extend(triplets)
        local_energy.extend(energies)
    global_ = grams.triplets()
    targets: list[Triplets] = []
    for start in range(0, max(k - horizon, 0), _PAIR_BATCH):
        t0 = list(range(start, min(start + _PAIR_BATCH, k - horizon)))
        targets.extend(_pair_triplets(chunk, grams, [t + horizon for t in t0], t0, scratch, derive_globals=False)[0])
    return aligned_features(global_, local_seq, targets, lag=lag, global_energy=grams.energies(), local_energy=local_energy)


def aligned_features(
    global_: list[Triplets],
    local: list[Triplets],
    targets: list[Triplets],
    *,
    lag: int,
    global_energy: list[torch.Tensor],
    local_energy: list[torch.Tensor | None],
) -> Rank1Features:
    """NExt's features from the raw triplets of every step's global delta, of the local deltas
    (steps ``lag`` on) and of the targets (steps ``0 .. K-h-1``): each sequence sign-aligned along
    the steps, each target first aligned to the local delta of its step (shared by the LoRA factors
    and dense full-parameter deltas)."""
    k = len(global_)
    aligned_local: list[Triplets | None] = [None] * lag + list(align_signs(local))
    target: list[Triplets | None] = [None] * k
    previous: Triplets | None = None
    for t, triplet in enumerate(targets):
        reference = previous if previous is not None else aligned_local[t]
        target[t] = align_to(triplet, reference) if reference is not None else triplet
        previous = target[t]
    return Rank1Features(
        global_=align_signs(global_), local=aligned_local, target=target, global_energy=global_energy, local_energy=local_energy
    )


#: Steps whose delta blocks are formed at once (bounds the extra memory to ~this many steps).
_PAIR_BATCH = 4
_F64 = torch.float64


class _GlobalGrams:
    """``B_t^T B_t`` and ``A_t A_t^T`` (float64) of every step, computed or derived once."""

    def __init__(self, chunk: FactorChunk) -> None:
        self.chunk = chunk
        self.gb: dict[int, torch.Tensor] = {}
        self.ga: dict[int, torch.Tensor] = {}

    def compute(self, steps: list[int]) -> None:
        b, a = self.chunk.b[steps], self.chunk.a[steps]
        gb, ga = (b.mT @ b).to(_F64), (a @ a.mT).to(_F64)
        for i, t in enumerate(steps):
            self.gb[t], self.ga[t] = gb[i], ga[i]

    def energies(self) -> list[torch.Tensor]:
        """``|dW_t|_F^2`` ``(N,)`` per step, from the Grams."""
        s2 = self.chunk.scaling.to(_F64).square()
        return [s2 * (self.gb[t] * self.ga[t]).sum((-2, -1)) for t in range(self.chunk.num_steps)]

    def triplets(self) -> list[Triplets]:
        chunk, k = self.chunk, self.chunk.num_steps
        s2 = chunk.scaling.to(_F64).square().reshape(-1, 1, 1)
        gl = torch.stack([self.gb[t] for t in range(k)]) * s2
        gr = torch.stack([self.ga[t] for t in range(k)])
        coef_v, coef_u = solve_balanced(gl, gr)
        v = row_times(coef_v, chunk.a)
        u = mat_times(chunk.b, coef_u).mul_(chunk.scaling.to(chunk.b.dtype).reshape(-1, 1))
        batch = normalised(u, v)
        return [Triplets(batch.sigma[t], batch.u[t], batch.v[t]) for t in range(k)]


def contiguous_index(steps: list[int]) -> slice | list[int]:
    """A slice when ``steps`` is a non-empty contiguous run (indexing with it is a view, not a
    gather copy), else the list."""
    if steps and steps == list(range(steps[0], steps[-1] + 1)):
        return slice(steps[0], steps[-1] + 1)
    return steps


class _Scratch:
    """Difference buffers for up to ``_PAIR_BATCH`` step pairs, allocated once per call
    (filling fresh memory costs several times more than reusing it)."""

    def __init__(self, chunk: FactorChunk) -> None:
        self.chunk = chunk
        self.d: torch.Tensor | None = None
        self.f: torch.Tensor | None = None

    def take(self, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.d is None:
            size = min(_PAIR_BATCH, max(self.chunk.num_steps - 1, 1))
            self.d = torch.empty((size, *self.chunk.b.shape[1:]), dtype=self.chunk.b.dtype, device=self.chunk.b.device)
            self.f = torch.empty((size, *self.chunk.a.shape[1:]), dtype=self.chunk.a.dtype, device=self.chunk.a.device)
        assert self.f is not None
        return self.d[:pairs], self.f[:pairs]


def _pair_triplets(
    chunk: FactorChunk, grams: _GlobalGrams, t1: list[int], t0: list[int], scratch: _Scratch, *, derive_globals: bool
) -> tuple[list[Triplets], list[torch.Tensor]]:
    """Top triplets and squared Frobenius norms of ``dW_t1 - dW_t0`` for the given step pairs
    (all modules), never dense."""
    b1, b0 = chunk.b[contiguous_index(t1)], chunk.b[contiguous_index(t0)]
    a1, a0 = chunk.a[contiguous_index(t1)], chunk.a[contiguous_index(t0)]
    d, f = scratch.take(len(t1))
    torch.sub(b1, b0, out=d)  # (P, N, m, r)
    torch.sub(a1, a0, out=f)  # (P, N, r, n)
    dd, db = (d.mT @ d).to(_F64), (d.mT @ b0).to(_F64)
    ff, fa = (f @ f.mT).to(_F64), (f @ a0.mT).to(_F64)
    if derive_globals:  # pairs (t, t - 1) in increasing t
        for i, (s1, s0) in enumerate(zip(t1, t0)):
            grams.gb[s1] = grams.gb[s0] + db[i] + db[i].mT + dd[i]
            grams.ga[s1] = grams.ga[s0] + fa[i] + fa[i].mT + ff[i]
    gb0 = torch.stack([grams.gb[t] for t in t0])
    ga1 = torch.stack([grams.ga[t] for t in t1])
    s2 = chunk.scaling.to(_F64).square().reshape(-1, 1, 1)
    gl = symmetric_blocks(dd, db, gb0) * s2
    cross = fa.mT + ff  # A_t1 F^T
    gr = symmetric_blocks(ga1, cross, ff)
    energy = (gl * gr).sum((-2, -1))  # (P, N)
    coef_v, coef_u = solve_balanced(gl, gr)
    r = chunk.b.shape[-1]
    v = row_times(coef_v[..., :r], a1).add_(row_times(coef_v[..., r:], f))
    u = mat_times(d, coef_u[..., :r]).add_(mat_times(b0, coef_u[..., r:]))
    u.mul_(chunk.scaling.to(chunk.b.dtype).reshape(-1, 1))
    batch = normalised(u, v)
    return [Triplets(batch.sigma[i], batch.u[i], batch.v[i]) for i in range(len(t1))], list(energy.unbind(0))
