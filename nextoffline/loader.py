"""Stream a trajectory as :class:`~nextoffline.ops.chunk.FactorChunk` batches.

Modules of identical shape are grouped; each group is cut into chunks that fit a memory
budget, and each chunk is read across all steps (one open reader per step, one tensor at a
time), checked finite, upcast to the compute dtype and moved to the compute device once.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from nextoffline.errors import NumericalError
from nextoffline.io.reader import TensorReader, open_tensors
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.device import COMPUTE_DTYPE, to_compute
from nextoffline.types import LoraModule, Trajectory

__all__ = ["ChunkPlan", "plan_chunks", "open_readers", "read_chunk", "DEFAULT_CHUNK_BYTES"]

LOG = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ChunkPlan:
    """A list of same-shape modules read and processed together."""

    modules: tuple[LoraModule, ...]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]


def plan_chunks(trajectory: Trajectory, *, num_steps: int | None = None, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> list[ChunkPlan]:
    """Cut every shape group into chunks whose fp32 factors over all steps fit ``budget_bytes``."""
    steps = num_steps or len(trajectory.steps)
    plans: list[ChunkPlan] = []
    for (m, n, r), modules in trajectory.groups().items():
        per_module = steps * (m + n) * r * torch.finfo(COMPUTE_DTYPE).bits // 8
        size = max(1, budget_bytes // max(per_module, 1))
        plans.extend(ChunkPlan(tuple(modules[i : i + size])) for i in range(0, len(modules), size))
    return plans


@contextmanager
def open_readers(trajectory: Trajectory) -> Iterator[list[TensorReader]]:
    """One lazy reader per step, closed on exit."""
    readers: list[TensorReader] = []
    try:
        for ref in trajectory.steps:
            readers.append(open_tensors(ref.weights_file))
        yield readers
    finally:
        for reader in readers:
            reader.close()


def _checked(reader: TensorReader, key: str, device: torch.device) -> torch.Tensor:
    tensor = to_compute(reader.get(key), device)
    if not torch.isfinite(tensor).all():
        raise NumericalError(f"{reader.path}: tensor {key} holds NaN or Inf; use an earlier checkpoint or drop this step")
    return tensor


def read_chunk(
    plan: ChunkPlan,
    trajectory: Trajectory,
    readers: Sequence[TensorReader],
    device: torch.device,
    *,
    step_index: Sequence[int] | None = None,
) -> FactorChunk:
    """Read the factors of ``plan`` at the given steps (default all) into one chunk."""
    index = list(range(len(readers))) if step_index is None else list(step_index)
    b = torch.stack([torch.stack([_checked(readers[t], m.b_key, device) for m in plan.modules]) for t in index])
    a = torch.stack([torch.stack([_checked(readers[t], m.a_key, device) for m in plan.modules]) for t in index])
    steps = torch.tensor([trajectory.steps[t].step for t in index], dtype=torch.float64)
    scaling = torch.tensor([m.scaling for m in plan.modules], dtype=COMPUTE_DTYPE, device=device)
    return FactorChunk(names=plan.names, steps=steps, b=b, a=a, scaling=scaling)
