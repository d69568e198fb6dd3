"""The on-disk artifacts: one label rule, the typed manifest's round trip and reader errors, key and step patterns."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextoffline.artifacts import MANIFEST_NAME, Manifest, candidate_label, read_manifest, write_manifest
from nextoffline.errors import OutputError
from nextoffline.formats.base import parse_step_dir
from nextoffline.formats.lora_keys import is_peft_lora_key, match_lora_key, peft_key


def test_candidate_labels_follow_how_the_target_was_asked_for() -> None:
    assert candidate_label(1.5, 125.0, by_step=False) == "coef_1.5"
    assert candidate_label(0.0, 80.0, by_step=False) == "coef_0"
    assert candidate_label(4 / 3, 120.0, by_step=True) == "step_120"
    assert candidate_label(0.7, 120.5, by_step=True) == "step_120.5"


def _manifest(**extra) -> Manifest:
    return Manifest(
        version="0.1.0",
        command="nextoffline extrapolate run --coef 1",
        source={"label": "run", "format": "peft", "steps": [10, 20, 30]},
        extrapolation={"method": "linear", "horizon_steps": 10.0, "rank_policy": "keep", "backtest": None, "note": ""},
        selected={"step": 40.0, "coef": 1.0, "kept_energy": 1.0, "score": 0.5},
        **extra,
    )


def test_manifest_round_trips_and_writes_its_card(tmp_path: Path) -> None:
    manifest = _manifest(candidates=[{"step": 30.0, "coef": 0.0, "score": 0.7}], lower_is_better=True)
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert "lower is better" in (tmp_path / "README.md").read_text()
    resumed = manifest.with_resume({"format": "peft", "checkpoint_dir": "resume", "command": "x", "notes": []})
    write_manifest(tmp_path, resumed)
    assert read_manifest(tmp_path).resume == resumed.resume and read_manifest(tmp_path).lower_is_better is True


def test_unscored_manifest_has_no_direction(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest())
    manifest = read_manifest(tmp_path)
    assert manifest.lower_is_better is None and "lower_is_better" not in (tmp_path / MANIFEST_NAME).read_text()


@pytest.mark.parametrize("content", [None, "{not json", '{"version": "1"}'])
def test_bad_manifests_are_one_line_errors(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(OutputError, match=MANIFEST_NAME):
        read_manifest(tmp_path)


def test_one_lora_key_pattern_for_saved_and_live_names() -> None:
    saved = match_lora_key("base_model.model.layers.0.q_proj.lora_A.weight")
    live = match_lora_key("base_model.model.layers.0.q_proj.lora_B.default.weight")
    embedding = match_lora_key("model.embed_tokens.lora_embedding_A.default")
    assert saved == ("base_model.model.layers.0.q_proj", "A", None, False)
    assert live == ("base_model.model.layers.0.q_proj", "B", "default", False)
    assert embedding == ("model.embed_tokens", "A", "default", True)
    assert match_lora_key("model.layers.0.q_proj.weight") is None
    assert peft_key("x.q_proj.lora_B.default.weight") == "x.q_proj.lora_B.weight"
    assert peft_key("m.embed.lora_embedding_B.default") == "m.embed.lora_embedding_B"
    assert peft_key("x.q_proj.lora_B.weight") is None  # already PEFT's name
    assert is_peft_lora_key("x.q_proj.lora_B.weight") and not is_peft_lora_key("x.q_proj.lora_B.default.weight")


def test_step_folder_names() -> None:
    names = ["checkpoint-40", "global_step_40", "global_step40", "step_40", "step-40", "iter_40"]
    assert [parse_step_dir(n) for n in names] == [40] * 6
    assert parse_step_dir("checkpoint-40_hf") is None and parse_step_dir("latest") is None
