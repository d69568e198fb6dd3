"""``nextoffline.hub`` against the local Hub: sources in, adapters out, and its error messages."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import save_file

from nextoffline.errors import HubError, SourceNotFoundError
from nextoffline.formats import detect_format
from nextoffline.hub import HubSource, is_hub_source, materialize_source, parse_hub_source, push_folder

STEPS = (10, 20, 30)


def write_adapter(folder: Path, seed: int, *, rank: int = 4, width: int = 16) -> Path:
    """A tiny PEFT LoRA adapter: two layers, q_proj and v_proj."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_trl_run(root: Path) -> Path:
    """``checkpoint-N/`` folders as transformers.Trainer writes them (trainer state as opaque bytes)."""
    for step in STEPS:
        checkpoint = write_adapter(root / f"checkpoint-{step}", step)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (checkpoint / "optimizer.pt").write_bytes(step.to_bytes(4, "little") * 100)
        (checkpoint / "rng_state.pth").write_bytes(b"rng")
    return root


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, following the run folder's symlinks."""
    files = (Path(folder, name) for folder, _, names in os.walk(root, followlinks=True) for name in names)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def repo_id(hub_env) -> str:
    return f"{hub_env.server.user}/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(hub_env) -> HfApi:
    return HfApi(token=hub_env.token)


@pytest.fixture
def branch_repo(tmp_path, hub_env, repo_id) -> tuple[str, Path]:
    """A repo with one ``step_N`` branch per step (pushed with ``push_folder``); returns it and the local steps."""
    local = tmp_path / "steps"
    for step in STEPS:
        push_folder(write_adapter(local / f"step_{step}", step), repo_id=repo_id, branch=f"step_{step}", token=hub_env.token)
    return repo_id, local


@pytest.fixture
def folder_repo(tmp_path, hub_env, repo_id, api) -> tuple[str, Path]:
    """A repo whose ``main`` holds a TRL run folder; returns it and the local run."""
    local = write_trl_run(tmp_path / "trl_run")
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=local, commit_message="run")
    return repo_id, local


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("hf://me/run", HubSource("me/run")),
        ("hf://me/run@v2", HubSource("me/run", "v2")),
        ("hf://me/run@v2/runs/exp1", HubSource("me/run", "v2", "runs/exp1")),
        ("hf://me/run/runs/exp1/", HubSource("me/run", None, "runs/exp1")),
        ("hf://me/run@refs/pr/3/adapters", HubSource("me/run", "refs/pr/3", "adapters")),
        ("hf://me/run@exp%2Fv2/adapters", HubSource("me/run", "exp/v2", "adapters")),
    ],
)
def test_parse_hub_source(spec, expected):
    assert is_hub_source(spec)
    assert parse_hub_source(spec) == expected
    assert parse_hub_source(str(expected)) == expected


@pytest.mark.parametrize("spec", ["me/run", "hf://me", "hf://me/run@", "hf://datasets/me/run", "hf://me//run"])
def test_parse_hub_source_rejects_bad_specs_in_one_line(spec):
    with pytest.raises(HubError) as info:
        parse_hub_source(spec)
    assert "hf://owner/repo[@revision][/subfolder]" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- materialize


def test_step_branches_become_step_folders(branch_repo, hub_env):
    repo_id, local = branch_repo
    run = materialize_source(f"hf://{repo_id}", token=hub_env.token)
    assert run.is_relative_to(hub_env.hf_home / "nextoffline" / "runs")
    assert sorted(p.name for p in run.iterdir()) == [f"step_{s}" for s in STEPS]
    assert digests(run) == digests(local)
    fmt = detect_format(run)
    assert fmt.name == "peft" and [ref.step for ref in fmt.list_steps(run)] == list(STEPS)


def test_step_folders_of_one_revision_without_trainer_state(folder_repo, hub_env):
    repo_id, local = folder_repo
    run = materialize_source(f"hf://{repo_id}", token=hub_env.token, progress=False)
    expected = {k: v for k, v in digests(local).items() if not k.endswith((".pt", ".pth"))}
    assert digests(run) == expected
    fmt = detect_format(run)
    assert fmt.name == "trl" and [ref.step for ref in fmt.list_steps(run)] == list(STEPS)


def test_trainer_state_on_request(folder_repo, hub_env):
    repo_id, local = folder_repo
    run = materialize_source(f"hf://{repo_id}@main", token=hub_env.token, include_trainer_state=True, progress=False)
    assert digests(run) == digests(local)


def test_nested_step_folders_are_found_below_the_subfolder(tmp_path, hub_env, repo_id, api):
    local = tmp_path / "verl_run"
    for step in STEPS:
        write_adapter(local / f"global_step_{step}" / "actor" / "lora_adapter", step)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=local, path_in_repo="runs/exp1", commit_message="verl run")
    api.upload_file(path_or_fileobj=b"# notes\n", path_in_repo="README.md", repo_id=repo_id)
    for spec in (f"hf://{repo_id}", f"hf://{repo_id}@main/runs", f"hf://{repo_id}/runs/exp1"):
        run = materialize_source(spec, token=hub_env.token, progress=False)
        assert digests(run) == digests(local), spec


def test_step_folders_under_two_parents_are_ambiguous(tmp_path, hub_env, repo_id, api):
    api.create_repo(repo_id)
    for exp in ("a", "b"):
        write_adapter(tmp_path / exp / "checkpoint-10", 0)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path, allow_patterns=["a/*", "b/*"], commit_message="two")
    with pytest.raises(HubError, match=r"several folders \(a, b\)"):
        materialize_source(f"hf://{repo_id}", token=hub_env.token, progress=False)
    assert digests(materialize_source(f"hf://{repo_id}/b", token=hub_env.token, progress=False)) == digests(tmp_path / "b")


def test_offline_reuses_a_warm_cache(branch_repo, hub_env):
    repo_id, local = branch_repo
    online = materialize_source(f"hf://{repo_id}", token=hub_env.token, progress=False)
    hub_env.set_offline()
    offline = materialize_source(f"hf://{repo_id}", progress=False)
    assert offline == online and digests(offline) == digests(local)


def test_offline_cannot_add_trainer_state(folder_repo, hub_env):
    repo_id, _ = folder_repo
    materialize_source(f"hf://{repo_id}", token=hub_env.token, progress=False)
    hub_env.set_offline()
    with pytest.raises(HubError, match="not \\(fully\\) in the local cache and HF_HUB_OFFLINE is set") as info:
        materialize_source(f"hf://{repo_id}", include_trainer_state=True, progress=False)
    assert "\n" not in str(info.value)


def test_offline_with_a_cold_cache_says_what_to_do(branch_repo, hub_env):
    repo_id, _ = branch_repo
    hub_env.set_offline()
    with pytest.raises(HubError) as info:
        materialize_source(f"hf://{repo_id}", progress=False)
    message = str(info.value)
    assert message.startswith(f"hf://{repo_id}: ") and "run once online" in message and "\n" not in message


# --------------------------------------------------------------------------- errors


def test_hub_failures_are_one_line_hub_errors(folder_repo, hub_env, api):
    repo_id, local = folder_repo
    private, gated = f"{repo_id}-private", f"{repo_id}-gated"
    api.create_repo(private, private=True)
    api.create_repo(gated)
    api.upload_folder(repo_id=gated, folder_path=local, commit_message="run")
    api.update_repo_settings(gated, gated="auto")
    cases = [
        (f"hf://{repo_id}-missing", hub_env.token, "repository not found"),
        (f"hf://{private}", None, "pass --token or set HF_TOKEN"),
        (f"hf://{repo_id}@no-such-branch", hub_env.token, "revision not found"),
        (f"hf://{repo_id}/no/such/folder", hub_env.token, "no such file or folder"),
        (f"hf://{repo_id}", "hf_not_a_token", "authentication failed"),
        (f"hf://{private}", None, "repository not found"),
        (f"hf://{gated}", hub_env.server.other_token, "the repo is gated"),
    ]
    for spec, token, expected in cases:
        with pytest.raises(HubError) as info:
            materialize_source(spec, token=token, progress=False)
        message = str(info.value)
        assert message.startswith(f"{spec}: ") and expected in message and "\n" not in message, message


def test_a_repo_without_steps_is_explained(hub_env, repo_id, api):
    api.create_repo(repo_id)
    with pytest.raises(HubError, match="no step branches .* and no step-named folders"):
        materialize_source(f"hf://{repo_id}", token=hub_env.token, progress=False)


def test_unreachable_endpoint_names_hf_endpoint(hub_env):
    hub_env.set_endpoint(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HubError, match="cannot reach the Hub .*HF_ENDPOINT") as info:
        materialize_source("hf://someone/run", progress=False)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- push


def test_push_folder_round_trips(tmp_path, hub_env, repo_id):
    folder = write_adapter(tmp_path / "out", 7)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# extrapolated\n")
    url = push_folder(folder, repo_id=repo_id, token=hub_env.token, commit_message="extrapolated adapter")
    assert url == f"{hub_env.endpoint}/{repo_id}/tree/main"
    snapshot = Path(snapshot_download(repo_id, token=hub_env.token))
    assert {k: v for k, v in digests(snapshot).items() if k != ".gitattributes"} == digests(folder)
    assert next(c.title for c in HfApi(token=hub_env.token).list_repo_commits(repo_id)) == "extrapolated adapter"


def test_push_folder_to_a_new_branch_of_a_private_repo(tmp_path, hub_env, repo_id):
    folder = write_adapter(tmp_path / "out", 8)
    url = push_folder(folder, repo_id=repo_id, branch="step_40", private=True, token=hub_env.token)
    assert url.endswith(f"/{repo_id}/tree/step_40")
    assert HfApi(token=hub_env.token).model_info(repo_id).private
    snapshot = Path(snapshot_download(repo_id, revision="step_40", token=hub_env.token))
    assert digests(snapshot)["adapter_model.safetensors"] == digests(folder)["adapter_model.safetensors"]
    with pytest.raises(HubError, match="repository not found"):
        materialize_source(f"hf://{repo_id}", progress=False)  # anonymous


def test_push_folder_errors(tmp_path, hub_env, repo_id):
    with pytest.raises(SourceNotFoundError):
        push_folder(tmp_path / "missing", repo_id=repo_id, token=hub_env.token)
    folder = write_adapter(tmp_path / "out", 9)
    with pytest.raises(HubError, match=f"hf://{repo_id}: access denied") as info:
        push_folder(folder, repo_id=repo_id, token=hub_env.server.read_token)
    assert "\n" not in str(info.value)
    with pytest.raises(HubError, match="authentication failed"):
        push_folder(folder, repo_id=repo_id, token="hf_not_a_token")
