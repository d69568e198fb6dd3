"""hf:// sources and push through the CLI, against the local Hub-compatible server (real client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import load_file

from tests.conftest import FIXTURES, make_trajectory, tree_hashes


def cli(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner(env=env).invoke(__import__("nextoffline.cli", fromlist=["main"]).main, [*map(str, args), "-q"])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.fixture
def uploaded(tmp_path: Path, hub_env) -> dict[str, object]:
    """The same synthetic trajectory as step_N branches and as subfolders of main."""
    local = make_trajectory(tmp_path / "local", law="sqrt", noise=0.02)
    api = HfApi(token=hub_env.token)
    branches, folders = f"{hub_env.server.user}/branches", f"{hub_env.server.user}/folders"
    api.create_repo(branches, exist_ok=True)
    for step_dir in sorted(local.iterdir()):
        api.create_branch(branches, branch=step_dir.name, exist_ok=True)
        api.upload_folder(repo_id=branches, folder_path=step_dir, revision=step_dir.name, commit_message=step_dir.name)
    api.create_repo(folders, exist_ok=True)
    api.upload_folder(repo_id=folders, folder_path=local, path_in_repo="runs/a", commit_message="run")
    return {"local": local, "branches": f"hf://{branches}", "folders": f"hf://{folders}/runs/a"}


def test_hub_sources_give_the_same_results_as_local_files(tmp_path: Path, hub_env, uploaded) -> None:
    local = uploaded["local"]
    reference = {}
    for name, source in (("local", local), ("branches", uploaded["branches"]), ("folders", uploaded["folders"])):
        code, inspect_out = cli("inspect", source, "--json")
        assert code == 0, inspect_out
        code, backtest_out = cli("backtest", source, "--json", "--methods", "linear,power")
        assert code == 0, backtest_out
        code, out = cli("extrapolate", source, "--to-step", "100", "--method", "power", "--out", tmp_path / f"out_{name}")
        assert code == 0, out
        inspect_report = {k: v for k, v in json.loads(inspect_out).items() if k != "source"}
        weights = load_file(tmp_path / f"out_{name}" / "adapter_model.safetensors")
        result = (inspect_report, json.loads(backtest_out)["errors"], weights)
        if reference:
            assert result[0] == reference[0] and result[1] == reference[1], name
            assert result[2].keys() == reference[2].keys() and all(torch.equal(result[2][k], reference[2][k]) for k in result[2]), name
        else:
            reference = result
    assert tree_hashes(local) == tree_hashes(uploaded["local"])


def test_push_then_snapshot_download_returns_the_identical_adapter(tmp_path: Path, hub_env) -> None:
    code, out = cli("extrapolate", FIXTURES / "synthetic_sqrt", "--coef", "1", "--method", "linear", "--out", tmp_path / "out")
    assert code == 0, out
    repo = f"{hub_env.server.user}/pushed"
    code, out = cli("push", tmp_path / "out", "--repo", repo, "--token", hub_env.token)
    assert code == 0, out
    assert out.strip().endswith(f"{repo}/tree/main")
    downloaded = Path(snapshot_download(repo, token=hub_env.token, cache_dir=tmp_path / "dl"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "nextoffline.json", "README.md"):
        assert (downloaded / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    card = (downloaded / "README.md").read_text()
    assert "synthetic_sqrt" in card and "linear" in card


def test_hub_errors_are_one_line(tmp_path: Path, hub_env) -> None:
    code, out = cli("inspect", f"hf://{hub_env.server.user}/does-not-exist")
    assert code == 1 and out.count("\n") == 1 and "does-not-exist" in out and "Traceback" not in out
    code, out = cli("push", FIXTURES / "synthetic_sqrt", "--repo", f"{hub_env.server.user}/x")
    assert code == 1 and out.count("\n") == 1 and "nextoffline.json" in out
