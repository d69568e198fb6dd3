"""The on-disk artifacts nextoffline writes and reads back: names, manifest, labels, card.

Every file and folder name of an output (and of the PEFT adapter folders it reads) is defined
here once; the provenance manifest (``nextoffline.json``) is the typed :class:`Manifest`,
written by :func:`write_manifest` (with its model card) and read by :func:`read_manifest`;
candidate folders are named by :func:`candidate_label`. Pure names, dataclasses and text, plus
the two JSON reads/writes: no tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nextoffline.errors import OutputError
from nextoffline.io.writer import write_json, write_text

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_WEIGHTS_NAMES",
    "CANDIDATES_DIR",
    "CARD_NAME",
    "EVAL_LOG_DIR",
    "MANIFEST_NAME",
    "RESUME_DIR",
    "Manifest",
    "candidate_label",
    "is_output_folder",
    "model_card",
    "read_manifest",
    "write_manifest",
]

#: PEFT adapter config, read from every step and written into every output adapter.
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: PEFT adapter weights as nextoffline writes them.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT adapter weight files nextoffline reads (safetensors preferred).
ADAPTER_WEIGHTS_NAMES = (ADAPTER_WEIGHTS_NAME, "adapter_model.bin")
#: Provenance manifest of an output adapter folder.
MANIFEST_NAME = "nextoffline.json"
#: Model card of an output adapter folder.
CARD_NAME = "README.md"
#: ``--eval-cmd`` logs, one per candidate, under the output folder.
EVAL_LOG_DIR = "eval_logs"
#: ``--keep-all``: candidates not selected, one folder each, under the output folder.
CANDIDATES_DIR = "candidates"
#: ``--resumable``: the checkpoint in the trainer's own layout, under the output folder.
RESUME_DIR = "resume"

TOOL = "nextoffline"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def candidate_label(coef: float, target_step: float, *, by_step: bool) -> str:
    """Folder name of one candidate: ``step_N`` when it was requested by ``--to-step``, else ``coef_C``."""
    return f"step_{_number(target_step)}" if by_step else f"coef_{coef:g}"


@dataclass(frozen=True)
class Manifest:
    """The ``nextoffline.json`` of one output adapter folder: enough to reproduce and audit it.

    Attributes:
        version: nextoffline version that wrote it.
        command: the command line.
        source: where the trajectory came from (label, format, steps, file hashes).
        extrapolation: predictor, its settings, horizon, rank policy, backtest, note.
        selected: this folder's candidate (step, coefficient, energy kept, score...).
        candidates: every candidate of an evaluated sweep (``None`` without ``--eval-cmd``).
        lower_is_better: how the evaluator's scores rank (``None``: nothing was scored).
        resume: the resumable checkpoint written next to it (``None`` without ``--resumable``).
    """

    version: str
    command: str
    source: dict[str, Any]
    extrapolation: dict[str, Any]
    selected: dict[str, Any]
    candidates: list[dict[str, Any]] | None = None
    lower_is_better: bool | None = None
    resume: dict[str, Any] | None = None
    tool: str = field(default=TOOL)

    @property
    def scored(self) -> bool:
        """Whether an evaluator scored the candidates."""
        return any("score" in c for c in (self.candidates or [self.selected]))

    def with_resume(self, resume: Mapping[str, Any]) -> Manifest:
        return replace(self, resume=dict(resume))

    def with_selected(self, selected: Mapping[str, Any]) -> Manifest:
        return replace(self, selected=dict(selected))

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "tool": self.tool,
            "version": self.version,
            "command": self.command,
            "source": self.source,
            "extrapolation": self.extrapolation,
            "selected": self.selected,
        }
        if self.candidates is not None:
            payload["candidates"] = self.candidates
        if self.lower_is_better is not None:
            payload["lower_is_better"] = self.lower_is_better
        if self.resume is not None:
            payload["resume"] = self.resume
        return payload

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Manifest:
        return cls(
            version=str(payload["version"]),
            command=str(payload.get("command", "")),
            source=dict(payload["source"]),
            extrapolation=dict(payload["extrapolation"]),
            selected=dict(payload["selected"]),
            candidates=[dict(c) for c in payload["candidates"]] if payload.get("candidates") is not None else None,
            lower_is_better=payload.get("lower_is_better"),
            resume=dict(payload["resume"]) if payload.get("resume") is not None else None,
            tool=str(payload.get("tool", TOOL)),
        )


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an adapter written by ``extrapolate`` (weights and manifest)."""
    return (folder / ADAPTER_WEIGHTS_NAME).is_file() and (folder / MANIFEST_NAME).is_file()


def read_manifest(folder: Path) -> Manifest:
    """The manifest of an output folder.

    Raises:
        OutputError: no manifest, or one that is not valid JSON with the expected fields.
    """
    path = folder / MANIFEST_NAME
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise OutputError(f"{path}: missing; pass an --out folder of `nextoffline extrapolate`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{path}: not a nextoffline manifest ({type(exc).__name__}: {exc}); re-run `nextoffline extrapolate`") from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``nextoffline.json`` and the model card ``README.md`` into ``folder``."""
    write_json(folder / MANIFEST_NAME, manifest.to_json())
    write_text(folder / CARD_NAME, model_card(manifest))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(manifest: Manifest) -> str:
    """A short README.md for an extrapolated adapter."""
    source, extra, chosen = manifest.source, manifest.extrapolation, manifest.selected
    lines = [
        "---",
        "library_name: peft",
        "tags: [lora, nextoffline, rlvr, extrapolation]",
        "---",
        "",
        "# Extrapolated LoRA adapter",
        "",
        f"Made by nextoffline {manifest.version} from `{source['label']}` ({source['format']} layout).",
        "",
        f"- source steps: {', '.join(map(str, source['steps']))}",
        f"- predictor: `{extra['method']}` {extra.get('predictor_settings', {})}",
        f"- target step: {_fmt(chosen['step'])} (coefficient {_fmt(chosen['coef'])}, horizon {_fmt(extra['horizon_steps'])} steps)",
        f"- rank policy: {extra['rank_policy']}; energy of the predicted update kept: {_fmt(chosen['kept_energy'])}",
    ]
    backtest = extra.get("backtest")
    if backtest:
        lines.append(f"- backtest (held-out steps {backtest['heldout_steps']}; 1.0 = no better than stopping):")
        lines += [f"  - `{name}`: {_fmt(err)}" for name, err in sorted(backtest["errors"].items(), key=lambda kv: kv[1])]
    if extra.get("note"):
        lines.append(f"- note: {extra['note']}")
    if manifest.candidates:
        direction = "" if manifest.lower_is_better is None else f" ({'lower' if manifest.lower_is_better else 'higher'} is better)"
        lines.append(
            "- candidates scored"
            + direction
            + ": "
            + ", ".join(f"coef {_fmt(c['coef'])}: {_fmt(c.get('score'))}" for c in manifest.candidates)
        )
    lines += [
        "",
        "Nothing guarantees that extrapolation helps: evaluate this adapter before relying on it.",
        "",
        f"Command: `{manifest.command}`",
        "",
    ]
    return "\n".join(lines)
