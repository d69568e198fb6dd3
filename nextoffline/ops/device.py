"""Device and dtype policy: resolve the compute device once, compute in fp32, store in the source dtype."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from nextoffline.errors import UsageError

__all__ = ["COMPUTE_DTYPE", "resolve_device", "single_thread", "to_compute"]

COMPUTE_DTYPE = torch.float32


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a concrete device (``auto`` = CUDA when available).

    Raises:
        UsageError: CUDA was asked for but is not available, or the spec is unknown.
    """
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r} does not exist ({torch.cuda.device_count()} CUDA devices); pick another index")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


def to_compute(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """Move to ``device`` and upcast to the compute dtype.

    On CPU, bf16 -> fp32 is done by a bit shift, several times faster than ``Tensor.float()``
    and exact (bf16 is the upper half of an fp32).
    """
    if tensor.dtype == torch.bfloat16 and dtype == torch.float32 and device.type == "cpu":
        widened = torch.empty(tensor.shape, dtype=torch.int32)
        widened.copy_(tensor.view(torch.int16))
        widened.bitwise_left_shift_(16)
        return widened.view(torch.float32)
    if device.type == "cuda" and tensor.device.type == "cpu" and tensor.element_size() < torch.finfo(dtype).bits // 8:
        # copy the narrow stored bytes (pinned memory: asynchronous), widen on the GPU
        return tensor.to(device=device, non_blocking=tensor.is_pinned()).to(dtype)
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


@contextmanager
def single_thread(device: torch.device | None = None) -> Iterator[None]:
    """Run the block with one intra-op thread on CPU (a no-op on other devices).

    Small batched LAPACK calls and memory-bound streaming passes gain nothing from BLAS threads,
    only synchronisation (measured 10-60x slower with 2 threads on a busy 2-core machine), and one
    thread makes CPU reductions independent of the thread count.
    """
    previous = torch.get_num_threads()
    if (device is not None and device.type != "cpu") or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
