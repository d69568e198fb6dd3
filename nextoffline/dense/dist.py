"""Scale-out with ``torch.distributed``: one process per rank, started by ``torchrun``.

``torchrun --nproc_per_node G [--nnodes N ...] -m nextoffline extrapolate ...`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`init_from_env` joins the group (NCCL when the
compute device is CUDA, gloo on CPU). Tensors are partitioned across ranks by
:func:`partition` (deterministic, by size); only small results (per-tensor Grams) travel.
Without ``WORLD_SIZE`` (or with 1) everything runs in-process and no group is created.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

__all__ = ["Group", "init_from_env", "partition"]

LOG = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Group:
    """This process' place in the job: ``rank`` of ``world`` (``world == 1``: no group)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (picklable objects; keep them small)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def main_first(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0 and share its result; an error there is raised on every rank
        (the same one-line error instead of peers hanging)."""
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = action()
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = exc
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_from_env(device: torch.device) -> Group:
    """Join the process group ``torchrun`` describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(device=device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    LOG.info("rank %d of %d on %s", rank, world, device)
    if rank != 0:  # one voice: the other ranks report only warnings and errors
        logging.getLogger("nextoffline").setLevel(max(logging.WARNING, logging.getLogger("nextoffline").getEffectiveLevel()))
    return Group(rank=rank, world=world, device=device, owns_group=owns)


def partition(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Indices of ``sizes`` per rank: largest first to the least-loaded rank (ties: lowest rank).

    Depends only on the sizes and ``world``, so every rank computes the same plan.
    """
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(world), key=lambda r: (loads[r], r))
        parts[target].append(i)
        loads[target] += sizes[i]
    return [sorted(p) for p in parts]
