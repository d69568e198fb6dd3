"""The unmodified ``huggingface_hub`` client against the local Hub of ``tests/hub_server.py``."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session

BIG_SIZE = 10 * 1000 * 1000 + 1  # the Hub's limit for regular (non-LFS) files is 10 MB


def sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digests(root: Path | str) -> dict[str, str]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def api(hub_env) -> HfApi:
    return HfApi(token=hub_env.token)


@pytest.fixture
def repo_id(hub_env) -> str:
    return f"{hub_env.server.user}/repo-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Small text files (regular uploads) and a binary weight file (LFS by .gitattributes)."""
    root = tmp_path / "upload"
    (root / "checkpoint-10").mkdir(parents=True)
    (root / "config.json").write_text('{"r": 4}\n')
    (root / "checkpoint-10" / "notes.txt").write_text("step ten\n")
    (root / "checkpoint-10" / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    return root


def test_whoami_reports_the_token_owner_and_refuses_a_bad_token(api, hub_env):
    assert api.whoami()["name"] == hub_env.server.user
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(token="hf_not_a_token").whoami()
    assert info.value.response.status_code == 401


def test_create_repo_is_idempotent_with_exist_ok(api, repo_id, hub_env):
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(hub_env.endpoint)
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(repo_id)
    assert info.value.response.status_code == 409
    assert api.list_repo_files(repo_id) == [".gitattributes"]


def test_upload_folder_uses_regular_and_lfs_uploads(api, repo_id, folder):
    (folder / "big.txt").write_bytes(b"a" * BIG_SIZE)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="first")
    entries = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True) if hasattr(e, "size")}
    assert entries["config.json"].lfs is None and entries["checkpoint-10/notes.txt"].lfs is None
    for lfs_path in ("checkpoint-10/adapter_model.safetensors", "big.txt"):
        assert entries[lfs_path].lfs.sha256 == sha256(folder / lfs_path)
        assert entries[lfs_path].size == (folder / lfs_path).stat().st_size
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["first", "initial commit"]


def test_downloads_are_byte_identical_and_cached(api, repo_id, folder, hub_env):
    api.create_repo(repo_id)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
    for name in ("config.json", "checkpoint-10/adapter_model.safetensors"):
        path = hf_hub_download(repo_id, name)
        assert sha256(path) == sha256(folder / name)
        assert Path(path).is_relative_to(hub_env.cache_dir) and commit.oid in path
    snapshot = snapshot_download(repo_id)
    assert tree_digests(snapshot) == {**tree_digests(folder), ".gitattributes": sha256(Path(snapshot, ".gitattributes"))}


def test_no_op_upload_makes_no_commit(api, repo_id, folder):
    api.create_repo(repo_id)
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="once")
    again = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="twice")
    assert again.oid == first.oid
    assert len(api.list_repo_commits(repo_id)) == 2


def test_branches_refs_and_snapshot_with_patterns_and_revision(api, repo_id, folder):
    api.create_repo(repo_id)
    api.create_branch(repo_id, branch="step_10")
    with pytest.raises(HfHubHTTPError) as info:
        api.create_branch(repo_id, branch="step_10")
    assert info.value.response.status_code == 409
    api.create_branch(repo_id, branch="step_10", exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision="step_10", commit_message="step 10")
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
    assert refs["step_10"] == commit.oid and refs["main"] != commit.oid
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert "config.json" in api.list_repo_files(repo_id, revision="step_10")
    for revision in ("step_10", commit.oid):
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json"])
        assert tree_digests(snapshot) == {k: v for k, v in tree_digests(folder).items() if not k.endswith(".txt")}


def test_private_repo_is_hidden_and_protected(api, repo_id, hub_env):
    server = hub_env.server
    api.create_repo(repo_id, private=True)
    assert api.model_info(repo_id).private is True
    for token in (False, server.other_token):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, token=False)
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(token="hf_not_a_token").model_info(repo_id)
    assert info.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(token=server.read_token).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert info.value.response.status_code == 403


def test_write_needs_a_token_of_the_namespace(repo_id, hub_env):
    for token, status in ((False, 401), (hub_env.server.other_token, 403), (hub_env.server.read_token, 403)):
        with pytest.raises(HfHubHTTPError) as info:
            HfApi(token=token).create_repo(repo_id)
        assert info.value.response.status_code == status


def test_gated_repo_refuses_downloads_to_others(api, repo_id, hub_env, tmp_path):
    api.create_repo(repo_id)
    api.update_repo_settings(repo_id, gated="auto")
    assert hf_hub_download(repo_id, ".gitattributes", token=hub_env.token)  # the owner may
    for token in (hub_env.server.other_token, False):  # another cache: the owner's copy would be served from it
        with pytest.raises(GatedRepoError):
            hf_hub_download(repo_id, ".gitattributes", token=token, cache_dir=tmp_path / "other")


def test_unknown_repo_revision_and_file_map_to_typed_errors(api, repo_id):
    api.create_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{repo_id}-missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{repo_id}-missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="missing-folder"))


def test_commit_refuses_a_stale_parent(api, repo_id):
    api.create_repo(repo_id)
    stale = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as info:
        api.upload_file(path_or_fileobj=b"two", path_in_repo="b.txt", repo_id=repo_id, parent_commit=stale)
    assert info.value.response.status_code == 412


def test_resolve_serves_byte_ranges_for_resumed_downloads(api, repo_id, folder, hub_env):
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload")
    headers = build_hf_headers(token=hub_env.token)
    for name in ("config.json", "checkpoint-10/adapter_model.safetensors"):  # regular, then LFS (via the redirect)
        response = get_session().get(hf_hub_url(repo_id, name), headers={**headers, "Range": "bytes=2-5"})
        assert response.status_code == 206 and response.content == (folder / name).read_bytes()[2:6]
