"""Extrapolate inside a running TRL / Hugging Face ``Trainer``: :class:`ExtrapolationCallback`.

At each chosen step ``N`` the callback makes the Trainer save ``checkpoint-N``, then (in
``on_save``, on the main process, on the device of the LoRA weights) runs the library path of
``nextoffline extrapolate`` on the run's checkpoints so far (:func:`~nextoffline.trajectory.load_trajectory`,
:func:`~nextoffline.pipeline.extrapolate`, :func:`~nextoffline.output.save_extrapolation`),
writes ``<output_dir>/nextoffline/step_N/`` and, when the result moves the weights (and an
optional ``eval_fn`` does not score it worse), copies the extrapolated LoRA factors into the
live model in place. Under DDP the main process broadcasts them to every rank, so the next
optimizer step of every rank trains from them.

Decisions are recorded in ``<output_dir>/nextoffline/jumps.json``. A run resumed from the
checkpoint of a jump step re-applies the recorded adapter (``checkpoint-N`` itself holds the
weights before the jump); resumed later, it continues from the checkpoint, which already holds
the jump. Extrapolation and ``eval_fn`` run with the RNG state saved and restored, so the
training run's random stream is the one it would have been without them, and a resumed run
continues exactly as the original one did.

After a jump, a later extrapolation only uses checkpoints saved after the last applied jump
(a trajectory across a jump is not smooth). The trainer's ``save_total_limit`` can leave too
few checkpoints; the callback then skips that step and says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError as exc:  # pragma: no cover - the [trl] extra is missing
    raise ImportError("nextoffline.integrations.trl needs transformers: pip install 'nextoffline[trl]'") from exc

from nextoffline.errors import NextOfflineError, UsageError
from nextoffline.integrations.live import MOMENT_POLICIES, LiveLora, adjust_moments, broadcast_from_main, rng_preserved

__all__ = ["MOMENT_POLICIES", "STATE_DIR", "ExtrapolationCallback", "JumpRecord", "LiveLora", "adjust_moments", "broadcast_from_main"]

LOG = logging.getLogger(__name__)

#: Folder under the trainer's ``output_dir`` holding one ``step_N/`` per extrapolation and the ledger.
STATE_DIR = "nextoffline"
LEDGER_NAME = "jumps.json"


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class JumpRecord:
    """What the callback decided at one step (one entry of ``jumps.json``)."""

    step: int
    applied: bool
    method: str
    coef: float
    target_step: float | None = None
    backtest_error: float | None = None
    relative_update: float | None = None
    score_before: float | None = None
    score_after: float | None = None
    checkpoints: list[int] = field(default_factory=list)
    folder: str | None = None
    note: str = ""

    def metrics(self) -> dict[str, Any]:
        """The values logged through the trainer (``nextoffline/*``)."""
        metrics: dict[str, Any] = {
            "nextoffline/method": self.method,
            "nextoffline/backtest_error": _nan_if_none(self.backtest_error),
            "nextoffline/coef": self.coef if self.applied else 0.0,
            "nextoffline/applied": 1.0 if self.applied else 0.0,
        }
        if self.score_before is not None and self.score_after is not None:
            metrics["nextoffline/eval_before"] = self.score_before
            metrics["nextoffline/eval_after"] = self.score_after
        return metrics


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _ledger_path(output_dir: Path) -> Path:
    return output_dir / STATE_DIR / LEDGER_NAME


def read_ledger(output_dir: Path) -> dict[int, JumpRecord]:
    """Recorded decisions by step (empty when the run never extrapolated)."""
    path = _ledger_path(output_dir)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["jumps"]
        return {int(e["step"]): JumpRecord(**e) for e in entries}
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: unreadable ({exc.__class__.__name__}); delete it to forget earlier extrapolations of this run") from None


def _write_ledger(output_dir: Path, records: Mapping[int, JumpRecord]) -> None:
    """Replace the ledger atomically (write a temporary file, then rename)."""
    from nextoffline.io.writer import json_safe

    path = _ledger_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"jumps": [asdict(records[s]) for s in sorted(records)]}
    tmp.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- callback


def _check_parallelism(args: Any) -> None:
    """Refuse sharded/partitioned training: the callback writes replicated parameters only."""
    state = getattr(args, "distributed_state", None)
    kind = str(getattr(state, "distributed_type", "") or "").upper()
    deepspeed = bool(getattr(args, "deepspeed", None)) or "DEEPSPEED" in kind or _env_flag("ACCELERATE_USE_DEEPSPEED")
    fsdp = bool(getattr(args, "fsdp", None)) or "FSDP" in kind or _env_flag("ACCELERATE_USE_FSDP")
    if deepspeed or fsdp:
        name = "DeepSpeed" if deepspeed else "FSDP"
        raise UsageError(
            f"ExtrapolationCallback does not support {name}: it writes replicated LoRA parameters in place, not "
            f"{name}'s partitioned parameters and fp32 master copies; train with DDP or one device, or extrapolate "
            "between runs with `nextoffline watch` / `nextoffline extrapolate --resumable`"
        )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


class ExtrapolationCallback(TrainerCallback):
    """Extrapolate the LoRA trajectory inside a running ``transformers.Trainer`` (every TRL trainer).

    Args:
        at_steps: steps after which to extrapolate (the Trainer is made to save a checkpoint there).
        every: alternative to ``at_steps``: every ``every`` steps (RL -> extrapolate -> RL repeated).
        method: predictor, as ``nextoffline extrapolate --method`` (``auto`` backtests and may keep
            the weights unchanged).
        coef: coefficient in horizons (``1`` = ``horizon`` checkpoints ahead), as ``--coef``.
        ahead: instead of ``coef``, the number of training steps to jump ahead (as ``--to-step N+ahead``).
        eval_fn: ``eval_fn(model) -> float``, called on the main process (in eval mode, without
            gradients) before and after the jump; the jump is kept only when it scores at least as well.
        lower_is_better: ``eval_fn`` returns a loss (smaller wins).
        optimizer_moments: ``keep``, ``rescale`` or ``reset`` the LoRA parameters' optimizer state
            after a jump (see :func:`adjust_moments`).
        holdout: checkpoints held out by ``auto``'s backtest (and by the backtest logged for a fixed method).
        horizon: horizon in checkpoints (default ``min(5, (K - 2) // 2)`` of the ``K`` checkpoints used).
        next_epochs: NExt training epochs (``method="next"`` or ``auto``).
        min_checkpoints: fewest checkpoints since the last applied jump needed to extrapolate.

    Under DDP only the main process extrapolates and calls ``eval_fn`` (which must therefore not
    use collectives); the other ranks wait in a broadcast, so a slow method (``next`` on large
    adapters) needs a ``ddp_timeout`` longer than it takes. With vLLM generation TRL syncs the
    jumped weights at the next step, as after any optimizer step.

    Example:
        >>> trainer = GRPOTrainer(..., peft_config=LoraConfig(...),
        ...                       callbacks=[ExtrapolationCallback(at_steps=[150], method="auto", coef=1.0)])
    """

    def __init__(
        self,
        at_steps: Sequence[int] | None = None,
        *,
        every: int | None = None,
        method: str = "auto",
        coef: float = 1.0,
        ahead: int | None = None,
        eval_fn: Callable[[Any], float] | None = None,
        lower_is_better: bool = False,
        optimizer_moments: str = "keep",
        holdout: int = 2,
        horizon: int | None = None,
        next_epochs: int = 200,
        min_checkpoints: int = 3,
    ) -> None:
        if (at_steps is None) == (every is None):
            raise UsageError("ExtrapolationCallback: give either at_steps=[N, ...] or every=N")
        self.at_steps = frozenset(int(s) for s in at_steps or ())
        if any(s < 1 for s in self.at_steps) or (every is not None and every < 1):
            raise UsageError("ExtrapolationCallback: steps must be positive")
        if not (math.isfinite(coef) and coef > 0) or (ahead is not None and ahead < 1):
            raise UsageError("ExtrapolationCallback: coef must be a positive number and ahead a positive step count")
        if optimizer_moments not in MOMENT_POLICIES:
            raise UsageError(f"ExtrapolationCallback: optimizer_moments={optimizer_moments!r}; use one of {', '.join(MOMENT_POLICIES)}")
        if method != "auto":
            from nextoffline.ops.predictors import parse_predictor_name

            parse_predictor_name(method)
        self.every = every
        self.method, self.coef, self.ahead = method, float(coef), ahead
        self.eval_fn, self.lower_is_better = eval_fn, lower_is_better
        self.optimizer_moments = optimizer_moments
        self.holdout, self.horizon, self.next_epochs = holdout, horizon, next_epochs
        self.min_checkpoints = max(3, min_checkpoints)
        #: every decision made in this process, in order
        self.records: list[JumpRecord] = []
        self._pending: dict[str, Any] = {}
        self._done: set[int] = set()

    # -- scheduling ---------------------------------------------------------------------------

    def is_trigger(self, step: int, max_steps: int) -> bool:
        """True at the steps to extrapolate after (never at the last step: nothing would train from it)."""
        if step < 1 or (max_steps > 0 and step >= max_steps):
            return False
        return step in self.at_steps if self.every is None else step % self.every == 0

    def on_init_end(self, args, state, control, **kwargs):
        _check_parallelism(args)
        self._run_first()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_parallelism(args)
        self._run_first()
        lora = LiveLora.from_model(model)
        if state.global_step > 0 and self.is_trigger(state.global_step, state.max_steps):
            self._reapply(args, state, lora, optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.is_trigger(state.global_step, state.max_steps):
            control.should_save = True  # the trajectory must include checkpoint-N
        return control

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.is_trigger(step, state.max_steps) and step not in self._done:
            self._done.add(step)
            self._jump(args, state, LiveLora.from_model(model), model, optimizer)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)  # reporters (wandb, tensorboard, ...) run after this callback
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}
        return control

    def _run_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer calls reporting callbacks (wandb, tensorboard, ...) before user callbacks;
        running first lets :meth:`on_log` add ``nextoffline/*`` values to the log entry they report.
        """
        handler = sys._getframe(2).f_locals.get("self")  # CallbackHandler.call_event <- on_* event
        if not isinstance(handler, CallbackHandler) or self not in handler.callbacks:
            LOG.warning(
                "ExtrapolationCallback: not called by a Trainer's CallbackHandler; nextoffline/* values reach only state.log_history"
            )
            return
        if handler.callbacks[0] is not self:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    # -- the jump -----------------------------------------------------------------------------

    def _jump(self, args, state, lora: LiveLora, model, optimizer) -> None:
        """At ``state.global_step``: extrapolate (main process), broadcast, adjust the optimizer."""
        before = lora.snapshot()
        record = None
        if state.is_world_process_zero:
            with rng_preserved(lora.device):
                record = self._extrapolate(Path(args.output_dir), state.global_step, lora, model, before)
        applied = broadcast_from_main(lora, record.applied if record else False)
        if applied:
            adjust_moments(optimizer, lora, before, self.optimizer_moments)
        if record is not None:
            self._record(Path(args.output_dir), record)

    def _reapply(self, args, state, lora: LiveLora, optimizer) -> None:
        """Resumed from the checkpoint of a jump step: apply the recorded jump again.

        ``checkpoint-N`` holds the weights and optimizer state from just before the jump, so
        loading the recorded adapter and adjusting the moments again reproduces the original run.
        """
        before = lora.snapshot()  # the checkpoint's weights, identical on every rank
        record = None
        if state.is_world_process_zero:
            record = read_ledger(Path(args.output_dir)).get(state.global_step)
            if record is not None and record.applied and record.folder:
                from nextoffline.artifacts import ADAPTER_WEIGHTS_NAME
                from nextoffline.io.reader import read_keys

                weights = Path(record.folder) / ADAPTER_WEIGHTS_NAME
                lora.load(read_keys(weights, lora.params), source=str(weights))
                LOG.info("nextoffline: resumed at step %d: re-applied the recorded extrapolation %s", state.global_step, record.folder)
        if broadcast_from_main(lora, bool(record and record.applied and record.folder)):
            adjust_moments(optimizer, lora, before, self.optimizer_moments)
            self._done.add(state.global_step)

    def _extrapolate(self, output_dir: Path, step: int, lora: LiveLora, model, before: dict[str, torch.Tensor]) -> JumpRecord:
        from nextoffline.formats import get_format
        from nextoffline.ops.predictors import NextOptions, PredictorOptions
        from nextoffline.output import save_extrapolation
        from nextoffline.pipeline import RunSettings, extrapolate
        from nextoffline.trajectory import load_trajectory

        ledger = read_ledger(output_dir)
        since = max((s for s, r in ledger.items() if r.applied and s < step), default=0)
        refs = [r for r in get_format("trl").list_steps(output_dir) if since < r.step <= step]
        used = [r.step for r in refs]
        if len(refs) < self.min_checkpoints or refs[-1].step != step:
            note = f"{len(refs)} checkpoint(s) since step {since} ({used}); at least {self.min_checkpoints} needed, ending at {step}"
            return self._skip(step, note, used)
        predictors = PredictorOptions(horizon=self.horizon, next=NextOptions(epochs=self.next_epochs))
        settings = RunSettings(device=lora.device, progress=False, predictors=predictors)
        try:
            trajectory = load_trajectory(
                adapters={r.step: r.checkpoint_dir for r in refs}, source_label=f"{output_dir} (in run, steps {used[0]}..{used[-1]})"
            )
            to_steps = [step + self.ahead] if self.ahead else []
            result = extrapolate(
                trajectory, settings, method=self.method, coefs=[] if to_steps else [self.coef], to_steps=to_steps, holdout=self.holdout
            )
            backtest_error = self._backtest_error(trajectory, result, settings)
        except NextOfflineError as exc:
            return self._skip(step, f"extrapolation failed: {exc}", used)
        candidate = result.candidates[0]
        moves = result.method != "none" and candidate.relative_update > 0
        score_before = score_after = None
        if moves:
            lora.load(candidate.tensors, source=f"extrapolation at step {step}")
            if self.eval_fn is not None:
                score_after = self._score(model)
                lora.load(before, source="weights before the jump")
                score_before = self._score(model)
                better = score_after <= score_before if self.lower_is_better else score_after >= score_before
                moves = better
                if better:
                    lora.load(candidate.tensors, source=f"extrapolation at step {step}")
        folder = output_dir / STATE_DIR / f"step_{step}"
        save_extrapolation(folder, trajectory, result, command=self._describe(step), overwrite=True)
        return JumpRecord(
            step=step,
            applied=moves,
            method=result.method,
            coef=candidate.coef,
            target_step=candidate.target_step,
            backtest_error=backtest_error,
            relative_update=candidate.relative_update,
            score_before=score_before,
            score_after=score_after,
            checkpoints=used,
            folder=str(folder),
            note=self._note(result, moves, score_before, score_after),
        )

    def _backtest_error(self, trajectory, result, settings) -> float | None:
        """Best backtest error of ``auto``, or the backtest of the fixed method when enough checkpoints remain."""
        from nextoffline.pipeline import backtest

        if result.backtest is not None:
            errors = [e for e in result.backtest.errors.values() if math.isfinite(e)]
            return min(errors) if errors else None
        if len(trajectory.steps) - self.holdout < 3:
            return None
        return backtest(trajectory, [self.method], settings, holdout=self.holdout).errors.get(self.method)

    def _score(self, model) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(self.eval_fn(model))
        finally:
            model.train(was_training)

    def _note(self, result, moves: bool, before: float | None, after: float | None) -> str:
        if result.method == "none":
            return result.note or "auto kept the latest weights"
        if before is not None and after is not None:
            verdict = "kept" if moves else "rejected"
            return f"{result.method} jump {verdict} by eval_fn ({after:.4g} vs {before:.4g} without it)"
        return result.note or f"{result.method} jump applied"

    def _skip(self, step: int, note: str, used: list[int]) -> JumpRecord:
        return JumpRecord(step=step, applied=False, method="none", coef=0.0, checkpoints=used, note=note)

    def _describe(self, step: int) -> str:
        what = f"every={self.every}" if self.every else f"at_steps={sorted(self.at_steps)}"
        jump = f"ahead={self.ahead}" if self.ahead else f"coef={self.coef:g}"
        return f"ExtrapolationCallback({what}, method={self.method!r}, {jump}, optimizer_moments={self.optimizer_moments!r}) at step {step}"

    def _record(self, output_dir: Path, record: JumpRecord) -> None:
        ledger = {s: r for s, r in read_ledger(output_dir).items() if s < record.step}  # later entries belong to an abandoned branch
        ledger[record.step] = record
        _write_ledger(output_dir, ledger)
        self.records.append(record)
        self._pending = record.metrics()
        level = logging.INFO if record.applied or record.method == "none" else logging.WARNING
        LOG.log(level, "nextoffline at step %d: %s (applied: %s)", record.step, record.note, "yes" if record.applied else "no")
