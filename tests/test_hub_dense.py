"""Full-parameter trajectories on the Hub (``hf://``): steps as folders or branches, ``--base hf://``,
the download cache, one-line errors, and pushing a full-parameter output, against the local Hub."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.file_download as file_download
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, constants, snapshot_download
from safetensors.torch import load_file

from nextoffline import hub
from nextoffline.cli import main
from tests.conftest import FIXTURES, tree_hashes
from tests.conftest_hub import _endpoint_settings

RUN = FIXTURES / "fullparam_sqrt"
BASE = FIXTURES / "tiny_base"
LATEST = RUN / "checkpoint-80"
TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


def cli(*args: object, quiet: bool = True) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*map(str, args), *(["-q"] if quiet else [])])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def repos(hub_server) -> dict[str, str]:
    """The fixture run as step folders under ``runs/full`` of main and as ``checkpoint-N`` branches (model in
    ``model/``), the base model, a LoRA run and a run saved as pytorch_model.bin; name -> repo id."""
    with pytest.MonkeyPatch.context() as patch:  # module scope: hub_env (per test) is not there yet
        for name, value in {"HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, **_endpoint_settings(hub_server.endpoint)}.items():
            patch.setattr(constants, name, value)
        return _upload(HfApi(endpoint=hub_server.endpoint, token=hub_server.token), hub_server.user)


def _upload(api: HfApi, user: str) -> dict[str, str]:
    """Create and fill the repos of :func:`repos`."""
    names = {k: f"{user}/dense-{k}" for k in ("folders", "branches", "base", "lora", "bin")}
    api.create_repo(names["folders"])
    api.upload_folder(repo_id=names["folders"], folder_path=RUN, path_in_repo="runs/full", commit_message="run")
    api.upload_file(path_or_fileobj=b"# notes\n", path_in_repo="README.md", repo_id=names["folders"])
    api.create_repo(names["branches"])
    for checkpoint in sorted(RUN.iterdir()):
        api.create_branch(names["branches"], branch=checkpoint.name)
        api.upload_folder(
            repo_id=names["branches"],
            folder_path=checkpoint,
            path_in_repo="model",
            revision=checkpoint.name,
            commit_message=checkpoint.name,
        )
    api.create_repo(names["base"])
    api.upload_folder(repo_id=names["base"], folder_path=BASE, commit_message="base")
    api.create_repo(names["lora"])
    api.upload_folder(repo_id=names["lora"], folder_path=FIXTURES / "synthetic_sqrt", commit_message="lora run")
    api.create_repo(names["bin"])
    for step in (10, 20, 30):
        api.upload_file(path_or_fileobj=b"not a pickle", path_in_repo=f"step_{step}/pytorch_model.bin", repo_id=names["bin"])
    return names


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """URLs of every file body downloaded (``huggingface_hub``'s one HTTP GET of file contents)."""
    seen: list[str] = []
    real = file_download.http_get

    def counting(url: str, *args, **kwargs):
        seen.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(file_download, "http_get", counting)
    return seen


@pytest.fixture(scope="module")
def local_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: ``extrapolate`` of the local run folder."""
    out = tmp_path_factory.mktemp("local") / "out"
    code, output = cli("extrapolate", RUN, "--coef", 1, "--method", "power", "--device", "cpu", "--out", out)
    assert code == 0, output
    return out


def tree_hashes_of(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]


# ------------------------------------------------------------------------------------ reading


def test_probing_reads_the_listing_only(hub_env, repos, downloads) -> None:
    assert hub.source_kind(f"hf://{repos['folders']}", token=hub_env.token) == hub.KIND_FULL
    assert hub.source_kind(f"hf://{repos['branches']}/model", token=hub_env.token) == hub.KIND_FULL
    assert hub.source_kind(f"hf://{repos['lora']}", token=hub_env.token) == hub.KIND_LORA
    assert downloads == []


@pytest.mark.parametrize("layout", ["folders", "branches"])
def test_hub_layouts_extrapolate_to_the_local_runs_bytes(tmp_path: Path, hub_env, repos, local_output, layout) -> None:
    from transformers import AutoModelForCausalLM

    spec = f"hf://{repos['folders']}" if layout == "folders" else f"hf://{repos['branches']}/model"
    out = tmp_path / "out"
    code, output = cli("extrapolate", spec, "--coef", 1, "--method", "power", "--device", "cpu", "--out", out)
    assert code == 0, output
    assert (out / "model.safetensors").read_bytes() == (local_output / "model.safetensors").read_bytes()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (LATEST / name).read_bytes(), name
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["source"]["label"] == spec and manifest["source"]["steps"] == list(range(10, 90, 10))
    assert manifest["source"]["format"] == "hf-trainer"
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], load_file(out / "model.safetensors")["model.norm.weight"])
    code, inspect_out = cli("inspect", spec, "--json", "--device", "cpu")
    assert code == 0, inspect_out
    code, local_inspect = cli("inspect", RUN, "--json", "--device", "cpu")
    assert code == 0, local_inspect
    report, expected = json.loads(inspect_out), json.loads(local_inspect)
    assert report.pop("source") == spec and {k: v for k, v in expected.items() if k != "source"} == report


def test_sharded_step_folders_at_the_repo_root(tmp_path: Path, hub_env, repos) -> None:
    """bf16 shards + index in ``step_N/`` at the root of main: the same shards as the local run."""
    from tests.test_fullparam import write_model_run

    local = write_model_run(tmp_path / "run", law="sqrt", dtype=torch.bfloat16, shard="10KB", steps=range(10, 50, 10))
    repo = f"{repos['folders']}-sharded"
    api = HfApi(token=hub_env.token)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=local, commit_message="sharded run")
    outputs = {}
    for name, source in (("local", local), ("hub", f"hf://{repo}")):
        outputs[name] = tmp_path / f"out_{name}"
        code, output = cli("extrapolate", source, "--coef", 1, "--method", "linear", "--chunk-mb", 1, "--out", outputs[name])
        assert code == 0, output
    weights = sorted(p.name for p in outputs["local"].glob("model*.safetensors*"))
    assert len(weights) > 2 and weights == sorted(p.name for p in outputs["hub"].glob("model*.safetensors*"))
    for name in weights:
        assert (outputs["hub"] / name).read_bytes() == (outputs["local"] / name).read_bytes(), name


def test_only_what_reading_needs_is_downloaded_once(tmp_path: Path, hub_env, repos, downloads) -> None:
    spec = f"hf://{repos['folders']}/runs"
    code, output = cli("backtest", spec, "--methods", "linear,power", "--json")
    assert code == 0, output
    per_step = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    wanted = [RUN / f"checkpoint-{step}" / name for step in range(10, 90, 10) for name in per_step]
    assert len(downloads) == len(set(tree_hashes_of(wanted)))  # identical files (configs) share one cached blob
    assert all("/runs/full/checkpoint-" in url or "/lfs/" in url for url in downloads)
    snapshot = next((hub_env.cache_dir / f"models--{repos['folders'].replace('/', '--')}" / "snapshots").iterdir())
    assert sorted(p.name for p in (snapshot / "runs" / "full" / "checkpoint-80").iterdir()) == sorted(per_step)
    downloads.clear()
    code, again = cli("backtest", spec, "--methods", "linear,power", "--json")
    assert code == 0 and json.loads(again) == json.loads(output)
    assert downloads == []  # the second run reads the cache
    hub_env.set_offline()
    code, offline = cli("backtest", spec, "--methods", "linear,power", "--json")
    assert code == 0 and json.loads(offline) == json.loads(output), offline


def test_resumable_downloads_the_trainer_state(tmp_path: Path, hub_env, repos) -> None:
    out = tmp_path / "out"
    code, output = cli("extrapolate", f"hf://{repos['folders']}", "--coef", 1, "--method", "linear", "--out", out, "--resumable")
    assert code == 0, output
    for name in TRAINER_STATE:
        assert (out / "resume" / "checkpoint-80" / name).read_bytes() == (LATEST / name).read_bytes(), name


def test_base_from_the_hub_equals_the_local_base(tmp_path: Path, hub_env, repos, downloads) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    args = ("extrapolate", RUN, "--coef", 1, "--method", "linear", "--device", "cpu")
    code, output = cli(*args, "--base", BASE, "--out", local)
    assert code == 0, output
    code, output = cli(*args, "--base", f"hf://{repos['base']}", "--out", remote)
    assert code == 0, output
    assert (remote / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (remote / "model.safetensors").read_bytes() != (LATEST / "model.safetensors").read_bytes()
    assert json.loads((remote / "nextoffline.json").read_text())["source"]["reference"] == f"hf://{repos['base']}"
    fetched = len(downloads)
    assert fetched == len([p for p in BASE.iterdir() if p.suffix in (".json", ".safetensors")])
    code, output = cli(*args, "--base", f"hf://{repos['base']}@main", "--out", tmp_path / "again")
    assert code == 0 and len(downloads) == fetched, output  # cached


# ------------------------------------------------------------------------------------- errors


def test_hub_errors_name_the_repo_and_the_fix(hub_env, repos, gated_repo) -> None:
    folders, branches, lora, token = repos["folders"], repos["branches"], repos["lora"], hub_env.token
    broken = f"{branches}-broken"  # step branches, one of them without the model/ folder
    api = HfApi(token=token)
    api.create_repo(broken)
    for step in (5, 10, 20):
        api.create_branch(broken, branch=f"checkpoint-{step}")
        if step > 5:
            api.upload_folder(repo_id=broken, folder_path=RUN / f"checkpoint-{step}", path_in_repo="model", revision=f"checkpoint-{step}")
    cases = [
        (("inspect", f"hf://{broken}/model"), token, "branch 'checkpoint-5' has no folder 'model'; remove or rename that branch"),
        (("inspect", f"hf://{folders}-missing"), token, f"hf://{folders}-missing: repository not found"),
        (("inspect", f"hf://{folders}@no-such-branch"), token, "revision not found"),
        (("inspect", f"hf://{folders}/no/such/folder"), token, "no such file or folder"),
        (("inspect", f"hf://{branches}/elsewhere"), token, "no such file or folder"),
        (("inspect", f"hf://{branches}"), token, f"holds its model in 'model', not in '/'; point at it with hf://{branches}/model"),
        (("inspect", f"hf://{gated_repo}"), hub_env.server.other_token, "the repo is gated"),
        (("inspect", f"hf://{folders}"), "hf_not_a_token", "authentication failed"),
        (("inspect", f"hf://{repos['bin']}"), token, "pytorch_model.bin); full-parameter trajectories are read from safetensors"),
        (
            ("inspect", f"hf://{lora}", "--full"),
            token,
            "holds LoRA adapters (adapter_config.json), not full-parameter checkpoints; drop --full",
        ),
        (
            ("inspect", RUN, "--base", f"hf://{folders}"),
            token,
            f"hf://{folders}: no model.safetensors or model.safetensors.index.json in '/'",
        ),
        (("inspect", RUN, "--base", f"hf://{repos['bin']}/step_10"), token, "save_pretrained(..., safe_serialization=True)"),
    ]
    for args, token_used, expected in cases:
        code, output = cli(*args, "--token", token_used)
        assert code == 1 and expected in output and output.count("\n") == 1 and "Traceback" not in output, (args, output)


@pytest.fixture
def gated_repo(hub_env, repos) -> str:
    """A gated copy of the folders repo (readable listing, downloads refused to other users)."""
    api = HfApi(token=hub_env.token)
    gated = f"{repos['folders']}-gated"
    if not api.repo_exists(gated):
        api.create_repo(gated)
        api.upload_folder(repo_id=gated, folder_path=LATEST, path_in_repo="checkpoint-80", commit_message="one")
        for step in (10, 20):
            api.upload_folder(repo_id=gated, folder_path=RUN / f"checkpoint-{step}", path_in_repo=f"checkpoint-{step}")
        api.update_repo_settings(gated, gated="auto")
    return gated


# --------------------------------------------------------------------------------------- push


def test_push_of_a_full_parameter_output_round_trips(tmp_path: Path, hub_env, local_output) -> None:
    folder = tmp_path / "out"
    shutil.copytree(local_output, folder)
    before = tree_hashes(folder)
    repo = f"{hub_env.server.user}/dense-pushed"
    code, output = cli("push", folder, "--repo", repo, "--token", hub_env.token)
    assert code == 0, output
    assert output.strip().endswith(f"{repo}/tree/main")
    downloaded = Path(snapshot_download(repo, token=hub_env.token, cache_dir=tmp_path / "dl"))
    assert tree_hashes(downloaded) == {**before, ".gitattributes": tree_hashes(downloaded)[".gitattributes"]}
    commits = list(HfApi(token=hub_env.token).list_repo_commits(repo))
    assert len(commits) == 2  # the repo's initial commit and one upload
    target = json.loads((folder / "nextoffline.json").read_text())["extrapolation"]["target_step"]
    assert commits[0].title == f"nextoffline: power extrapolation of {RUN} to step {target:g} (full-parameter)"
    assert tree_hashes(folder) == before
