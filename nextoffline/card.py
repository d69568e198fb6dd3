"""Pure text and dict builders: provenance manifest and model card (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["build_manifest", "model_card"]


def build_manifest(
    *,
    version: str,
    command: str,
    source: Mapping[str, Any],
    extrapolation: Mapping[str, Any],
    candidate: Mapping[str, Any],
    candidates: list[Mapping[str, Any]] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``nextoffline.json`` payload: enough to reproduce and audit one output."""
    manifest: dict[str, Any] = {
        "tool": "nextoffline",
        "version": version,
        "command": command,
        "source": dict(source),
        "extrapolation": dict(extrapolation),
        "selected": dict(candidate),
    }
    if candidates is not None:
        manifest["candidates"] = [dict(c) for c in candidates]
    if resume is not None:
        manifest["resume"] = dict(resume)
    return manifest


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(manifest: Mapping[str, Any]) -> str:
    """A short README.md for an extrapolated adapter."""
    source, extra, chosen = manifest["source"], manifest["extrapolation"], manifest["selected"]
    lines = [
        "---",
        "library_name: peft",
        "tags: [lora, nextoffline, rlvr, extrapolation]",
        "---",
        "",
        "# Extrapolated LoRA adapter",
        "",
        f"Made by nextoffline {manifest['version']} from `{source['label']}` ({source['format']} layout).",
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
    if manifest.get("candidates"):
        lines.append("- candidates scored: " + ", ".join(f"coef {_fmt(c['coef'])}: {_fmt(c.get('score'))}" for c in manifest["candidates"]))
    lines += [
        "",
        "Nothing guarantees that extrapolation helps: evaluate this adapter before relying on it.",
        "",
        f"Command: `{manifest['command']}`",
        "",
    ]
    return "\n".join(lines)
