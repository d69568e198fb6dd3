"""Small immutable records shared by every layer (formats, ops, pipeline, CLI)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LoraModule", "ResumeInfo", "StepRef", "Trajectory"]


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted weight: its tensor keys, shapes and scaling.

    The effective update is ``dW = scaling * B @ A`` with ``B`` of shape
    ``(out_features, rank)`` and ``A`` of shape ``(rank, in_features)``. When ``transposed``
    is true (``fan_in_fan_out`` layers, LoRA embeddings) the base weight stores ``dW.T``;
    nextoffline works on ``B @ A`` throughout and swaps ``u``/``v`` only when reporting.
    """

    name: str
    a_key: str
    b_key: str
    out_features: int
    in_features: int
    rank: int
    scaling: float
    transposed: bool = False

    @property
    def group_key(self) -> tuple[int, int, int]:
        """Modules sharing this key are stacked and decomposed in one batched call."""
        return (self.out_features, self.in_features, self.rank)


@dataclass(frozen=True)
class StepRef:
    """Where the adapter of one saved training step lives.

    Attributes:
        step: the global training step.
        adapter_dir: folder holding ``adapter_config.json`` of this step.
        weights_file: the file holding the LoRA tensors (safetensors, or a torch pickle).
        checkpoint_dir: the trainer-native folder of this step (same as ``adapter_dir`` for
            plain PEFT folders); ``--resumable`` outputs are built from it.
    """

    step: int
    adapter_dir: Path
    weights_file: Path
    checkpoint_dir: Path


@dataclass(frozen=True)
class Trajectory:
    """A validated sequence of LoRA checkpoints of one training run (tensors are not loaded)."""

    source: Path
    format_name: str
    steps: tuple[StepRef, ...]
    modules: tuple[LoraModule, ...]
    adapter_config: Mapping[str, Any]
    dtypes: Mapping[str, str]
    passthrough_keys: tuple[str, ...] = ()
    source_label: str = ""
    #: Exact power-of-two multipliers applied to ``s B`` and ``A`` for computing (1.0 unless the
    #: factors are extreme, e.g. ~1e15 or ~1e-30); results are divided back before writing.
    factor_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def step_numbers(self) -> list[int]:
        return [s.step for s in self.steps]

    @property
    def latest(self) -> StepRef:
        return self.steps[-1]

    def groups(self) -> dict[tuple[int, int, int], list[LoraModule]]:
        """Modules grouped by ``(out, in, rank)``, in a stable order."""
        grouped: dict[tuple[int, int, int], list[LoraModule]] = {}
        for module in self.modules:
            grouped.setdefault(module.group_key, []).append(module)
        return grouped


@dataclass(frozen=True)
class ResumeInfo:
    """What a ``--resumable`` writer produced and how to resume from it."""

    checkpoint_dir: Path
    command: str
    notes: tuple[str, ...] = field(default_factory=tuple)
