"""Learning rates a run logged, for the cumulative-learning-rate time axis (read-only, small files).

Sources, first found wins:

* Hugging Face ``Trainer`` / TRL: ``trainer_state.json`` of the latest checkpoint (its
  ``log_history`` entries with ``step`` and ``learning_rate``; every earlier log is repeated in
  the latest file), else a ``trainer_state.json`` in the run folder.

verl keeps only the current rate inside pickled ``extra_state_*.pt`` files and OpenRLHF inside
DeepSpeed's model-states file (which also holds the whole module); neither is read, so the ``lr``
axis is offered only where a ``trainer_state.json`` exists.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from nextoffline.types import Trajectory

__all__ = ["logged_learning_rates"]

LOG = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


def logged_learning_rates(trajectory: Trajectory) -> tuple[list[tuple[float, float]], str]:
    """``((step, learning rate) pairs, the file they came from)``; empty with a reason when none."""
    candidates = [trajectory.latest.checkpoint_dir / TRAINER_STATE, trajectory.source / TRAINER_STATE]
    for path in candidates:
        points = _from_trainer_state(path)
        if points:
            return points, str(path)
    return [], "no trainer_state.json with learning_rate in log_history"


def _from_trainer_state(path: Path) -> list[tuple[float, float]]:
    if not path.is_file():
        return []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        LOG.warning("%s: not readable as JSON (%s); the lr time axis is not offered", path, exc.__class__.__name__)
        return []
    history = state.get("log_history") if isinstance(state, dict) else None
    points: dict[float, float] = {}
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict):
            continue
        step, rate = entry.get("step"), entry.get("learning_rate")
        if _finite(step) and _finite(rate) and rate >= 0:
            points[float(step)] = float(rate)
    return sorted(points.items()) if len(points) >= 2 or (points and next(iter(points.values())) > 0) else []


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
