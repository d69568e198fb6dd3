"""Hugging Face Hub sources (``hf://owner/repo[@revision][/subfolder]``) and pushes.

The only module of the package that talks to the Hub. A Hub source becomes a LOCAL run folder
that the same code that reads local runs reads unchanged:

* **steps on branches**: when no revision is given and the repo has branches named like step
  folders (``step_N``, ``step-N``, ``checkpoint-N``, ``global_step_N``, ``global_stepN``,
  ``iter_N``), each branch holds one step's adapter or whole model (at its root or under the
  subfolder); the run folder gets one ``<branch>/`` link per branch.
* **steps in folders**: otherwise, one revision (default ``main``) holds step-named folders
  (nesting such as ``global_step_10/actor/lora_adapter/`` is fine for adapters; a whole model
  sits directly in its step folder), possibly below some folder that is found automatically;
  the run folder is a link to that folder.

Probing the repo's file listing (nothing downloaded) tells LoRA from full-parameter
trajectories: step folders (or step branches) holding ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` + index and no ``adapter_config.json`` are whole HF models.
Only what reading needs is downloaded (LoRA: adapter weights and small JSON configs through
``snapshot_download``; full-parameter: each step's weights, index, config, generation config and
tokenizer files through ``hf_hub_download``, one byte progress bar for the whole trajectory;
trainer state such as optimizer shards only on request) into the normal HF cache, which a
second run reuses without downloading again. The run folder is made of relative symlinks into
the cache and lives in ``$HF_HOME/nextoffline/runs/``. The commits each step came from (and,
for whole models, the file lists) are recorded in
``$HF_HOME/nextoffline/sources/`` so that ``HF_HUB_OFFLINE=1`` works from a warm cache, where
branches cannot be listed.

Settings (``HF_ENDPOINT``, ``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ...) are those of
``huggingface_hub``, read by it when it is imported. Every Hub failure becomes a one-line
:class:`~nextoffline.errors.HubError` that names the repo and says what to do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, RepoFile, constants, hf_hub_download, parse_hf_uri, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HfUriError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm

from nextoffline.artifacts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAMES
from nextoffline.errors import HubError, SourceNotFoundError
from nextoffline.formats.base import STEP_DIR

__all__ = [
    "KIND_FULL",
    "KIND_LORA",
    "HubSource",
    "is_hub_source",
    "materialize_model",
    "materialize_source",
    "parse_hub_source",
    "push_folder",
    "source_kind",
]

LOG = logging.getLogger(__name__)

HF_SCHEME = "hf://"
SOURCE_SYNTAX = "hf://owner/repo[@revision][/subfolder]"
DEFAULT_REVISION = "main"

#: Branch names that carry a step: the step folder names the local readers accept.
_STEP_BRANCH = STEP_DIR
#: Folder names that carry a step, plus OpenRLHF's ``global_stepN_hf`` adapter folders.
_STEP_FOLDER = re.compile(STEP_DIR.pattern + r"(?:_hf)?")
#: Files holding a step's LoRA weights: PEFT adapters, verl FSDP model shards.
_WEIGHT_FILE = re.compile("|".join(map(re.escape, ADAPTER_WEIGHTS_NAMES)) + r"|model_world_size_\d+_rank_\d+\.pt")

#: What a trajectory on the Hub holds: LoRA adapters, or whole models (full-parameter training).
KIND_LORA, KIND_FULL = "lora", "full-parameter"
#: A whole HF model's safetensors weights: one file, or shards plus their index.
_MODEL_WEIGHTS = re.compile(r"model(?:-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
#: The same saved as torch pickles, which full-parameter reading refuses with the fix.
_BIN_WEIGHTS = re.compile(r"pytorch_model(?:-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")
#: Besides its weights, what a model folder needs: config, generation config, tokenizer files.
_MODEL_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
#: Trainer state among those (downloaded only with ``include_trainer_state``).
_TRAINER_JSON = ("trainer_state.json",)
#: Parallel file downloads of a full-parameter trajectory.
_MAX_WORKERS = 8

_ADAPTER_FILES = (ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHTS_NAMES, "model_world_size_*_rank_*.pt", "*.json")
#: Optimizer / scheduler / FSDP / DeepSpeed shards, RNG states, trainer args, ``latest`` trackers, HF configs
#: (``trainer_state.json`` is among the JSON files above).
_TRAINER_STATE_FILES = ("*.pt", "rng_state*.pth", "training_args.bin", "latest*", "huggingface/*")


@dataclass(frozen=True)
class HubSource:
    """A parsed ``hf://owner/repo[@revision][/subfolder]`` source."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        revision = f"@{quote(self.revision, safe='')}" if self.revision else ""
        subfolder = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HF_SCHEME}{self.repo_id}{revision}{subfolder}"


@dataclass(frozen=True)
class _Layout:
    """Where a trajectory sits in a repo: revision name -> commit, and the folder holding the steps."""

    on_branches: bool  # True: one step per branch (the names); False: step folders in the one revision
    commits: dict[str, str]
    folder: str
    kind: str = KIND_LORA
    #: Full-parameter only: revision name -> [path, size] of every file under ``folder`` (what to download).
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


class _SilentTqdm(hf_tqdm):
    """``huggingface_hub``'s progress bar, always disabled (``progress=False``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def is_hub_source(spec: str) -> bool:
    """True for ``hf://...`` sources."""
    return spec.startswith(HF_SCHEME)


def parse_hub_source(spec: str) -> HubSource:
    """Parse ``hf://owner/repo[@revision][/subfolder]``.

    The revision ends at the first ``/`` (write ``%2F`` for a slash inside a branch name);
    ``refs/pr/N`` is recognised as a whole.

    Args:
        spec: The source as the user wrote it.

    Returns:
        The repo id, revision (``None`` when absent) and subfolder (``None`` when absent).

    Raises:
        HubError: ``spec`` is not a valid ``hf://`` model repo source.

    Example:
        >>> parse_hub_source("hf://me/grpo-run@v2/adapters")
        HubSource(repo_id='me/grpo-run', revision='v2', subfolder='adapters')
    """
    if not is_hub_source(spec):
        raise HubError(f"{spec!r} is not a Hub source; write {SOURCE_SYNTAX}")
    try:
        uri = parse_hf_uri(spec)
    except HfUriError as error:
        reason = str(error).removeprefix(f"Invalid HF URI '{spec}'.").strip()
        raise HubError(f"{spec}: {reason or 'invalid Hub source'}; write {SOURCE_SYNTAX}") from None
    if uri.type != "model":
        raise HubError(f"{spec}: {uri.type} repos are not supported; put the checkpoints in a model repo ({SOURCE_SYNTAX})")
    return HubSource(repo_id=uri.id, revision=uri.revision, subfolder=uri.path_in_repo.strip("/") or None)


def source_kind(spec: str, *, token: str | None = None) -> str:
    """Whether a Hub trajectory holds LoRA adapters or whole models, from its file listing alone.

    Nothing is downloaded; with ``HF_HUB_OFFLINE`` the last online discovery is used.

    Args:
        spec: ``hf://owner/repo[@revision][/subfolder]``.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.

    Returns:
        :data:`KIND_LORA` or :data:`KIND_FULL`.

    Raises:
        HubError: as :func:`materialize_source`, for the listing.
    """
    source = parse_hub_source(spec)
    with _hub_errors(str(source)):
        return _layout(source, token=token).kind


def materialize_source(
    spec: str,
    *,
    token: str | None = None,
    include_trainer_state: bool = False,
    progress: bool = True,
    kind: str | None = None,
) -> Path:
    """Make a Hub trajectory available as a local run folder and return its path.

    Args:
        spec: ``hf://owner/repo[@revision][/subfolder]``.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.
        include_trainer_state: Also download optimizer, scheduler, RNG and other trainer state
            (needed to write a resumable checkpoint); for full-parameter trajectories, every file
            of each step folder.
        progress: Show download progress bars.
        kind: The kind of trajectory the caller reads (:data:`KIND_LORA` or :data:`KIND_FULL`);
            another kind is refused. ``None`` accepts what probing finds.

    Returns:
        A folder under ``$HF_HOME/nextoffline/runs/`` whose step-named subfolders hold the
        downloaded files (symlinks into the HF cache).

    Raises:
        HubError: The repo, revision or subfolder is unknown or not accessible, it holds no
            steps (or not of ``kind``), the Hub is unreachable, or it is offline with a cold cache.

    Example:
        >>> run = materialize_source("hf://me/grpo-run")  # doctest: +SKIP
        >>> sorted(p.name for p in run.iterdir())  # doctest: +SKIP
        ['checkpoint-10', 'checkpoint-20', 'checkpoint-30']
    """
    source = parse_hub_source(spec)
    offline = constants.is_offline_mode()
    with _hub_errors(str(source)):
        layout = _layout(source, token=token)
        if kind is not None and layout.kind != kind:
            raise HubError(f"{source}: {_KIND_MISMATCH[kind]}")
        if layout.kind == KIND_FULL:
            targets = _download_models(source, layout, include_trainer_state, token=token, offline=offline, progress=progress)
        else:
            patterns = _allow_patterns(layout.folder, include_trainer_state)
            targets = {
                name: _download(source, name, commit, layout.folder, patterns, token=token, offline=offline, progress=progress)
                for name, commit in layout.commits.items()
            }
    run = _assemble(source, layout, targets)
    LOG.info(
        "%s: %d revision(s) %s, available at %s",
        source,
        len(targets),
        "as step branches" if layout.on_branches else f"with step folders under '{layout.folder or '/'}'",
        run,
    )
    return run


def materialize_model(spec: str, *, token: str | None = None, progress: bool = True) -> Path:
    """Download one HF model folder of a Hub repo (e.g. the step-0 model, ``--base``) and return it.

    Only the weights (``model.safetensors`` or shards and index), config, generation config and
    tokenizer files directly in the repo root (or the subfolder) are fetched, into the HF cache;
    a second call downloads nothing.

    Args:
        spec: ``hf://owner/repo[@revision][/subfolder]``.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.
        progress: Show the download progress bar.

    Returns:
        The model folder inside the HF cache's snapshot of that revision.

    Raises:
        HubError: The repo, revision or subfolder is unknown or not accessible, it holds no
            safetensors model weights, the Hub is unreachable, or it is offline with a cold cache.
    """
    source = parse_hub_source(spec)
    offline = constants.is_offline_mode()
    with _hub_errors(str(source)):
        if offline:
            layout = _recorded_layout(source, "model")
        else:
            api = HfApi(token=token)
            revision = source.revision or DEFAULT_REVISION
            commit = _commit_of(api, source, revision)
            listing = _listing(api, source.repo_id, commit, source.subfolder)
            layout = _Layout(False, {revision: commit}, source.subfolder or "", KIND_FULL, {revision: listing})
            _model_folder_files(source, layout.folder, listing)  # refuse a folder without safetensors weights now
            _write_json(_record_path(source, "model"), asdict(layout))
        (target,) = _download_models(source, layout, False, token=token, offline=offline, progress=progress, steps=False).values()
    return target


def push_folder(
    folder: Path,
    *,
    repo_id: str,
    branch: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` to a Hub model repo in one commit.

    The repo is created when missing (``private`` applies only then), and so is ``branch``
    (from the default branch).

    Args:
        folder: Local folder to upload (its content lands at the repo root).
        repo_id: ``owner/name``.
        branch: Branch to commit to; ``None`` for ``main``.
        private: Create the repo as private.
        token: Hub token with write access; ``None`` uses ``HF_TOKEN`` or the stored login.
        commit_message: Commit title; a default names the folder.

    Returns:
        The web URL of the pushed revision, ``{endpoint}/{repo_id}/tree/{branch}``.

    Raises:
        SourceNotFoundError: ``folder`` is not a folder.
        HubError: Authentication, permission, network or Hub failure.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceNotFoundError(f"{folder}: no such folder to push")
    api = HfApi(token=token)
    target = f"{HF_SCHEME}{repo_id}" + (f"@{branch}" if branch else "")
    with _hub_errors(target):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=branch, commit_message=commit_message or f"Upload {folder.name} with nextoffline"
        )
    LOG.info("pushed %s to %s (commit %s)", folder, target, commit.oid)
    return f"{api.endpoint}/{repo_id}/tree/{quote(branch or DEFAULT_REVISION, safe='')}"


# --------------------------------------------------------------------------- discovery

_KIND_MISMATCH = {
    KIND_FULL: "holds LoRA adapters (adapter_config.json), not full-parameter checkpoints; drop --full",
    KIND_LORA: "holds full-parameter checkpoints (whole models), not LoRA adapters",
}


def _layout(source: HubSource, *, token: str | None) -> _Layout:
    """The trajectory's layout: discovered online (and recorded), or the record when offline."""
    if constants.is_offline_mode():
        return _recorded_layout(source)
    layout = _discover(HfApi(token=token), source)
    _write_json(_record_path(source), asdict(layout))
    return layout


def _discover(api: HfApi, source: HubSource) -> _Layout:
    """Find the steps online: step branches first, else step folders in one revision."""
    if source.revision is None:
        branches = api.list_repo_refs(source.repo_id).branches
        steps = {ref.name: ref.target_commit for ref in branches if _STEP_BRANCH.fullmatch(ref.name)}
        if steps:
            return _branch_layout(api, source, dict(sorted(steps.items())))
    revision = source.revision or DEFAULT_REVISION
    commit = _commit_of(api, source, revision)
    listing = _listing(api, source.repo_id, commit, source.subfolder)
    kind, folder = _steps_parent([path for path, _ in listing], source)
    return _Layout(False, {revision: commit}, folder, kind, {revision: listing} if kind == KIND_FULL else {})


def _commit_of(api: HfApi, source: HubSource, revision: str) -> str:
    commit = api.repo_info(source.repo_id, revision=revision).sha
    if commit is None:
        raise HubError(f"{source}: the Hub did not report the commit of '{revision}'; check that HF_ENDPOINT is a Hub")
    return commit


def _listing(api: HfApi, repo_id: str, commit: str, folder: str | None) -> list[tuple[str, int]]:
    """Path and size of every file under ``folder`` (the whole repo for ``None``) at ``commit``."""
    entries = api.list_repo_tree(repo_id, path_in_repo=folder or None, recursive=True, revision=commit)
    return [(entry.path, entry.size) for entry in entries if isinstance(entry, RepoFile)]


def _branch_layout(api: HfApi, source: HubSource, commits: dict[str, str]) -> _Layout:
    """Step branches: their kind from the listing of the latest step's branch (all listed when full-parameter)."""
    folder = source.subfolder or ""
    latest = max(commits, key=lambda name: int(_STEP_BRANCH.fullmatch(name).group(1)))  # type: ignore[union-attr]
    listing = _listing(api, source.repo_id, commits[latest], source.subfolder)
    kind = _branch_kind(source, latest, folder, [path for path, _ in listing])
    files = {}
    if kind == KIND_FULL:
        files = {name: listing if name == latest else _branch_listing(api, source, name, commit) for name, commit in commits.items()}
    return _Layout(True, commits, folder, kind, files)


def _branch_listing(api: HfApi, source: HubSource, branch: str, commit: str) -> list[tuple[str, int]]:
    """One step branch's listing; a branch without the subfolder is named."""
    try:
        return _listing(api, source.repo_id, commit, source.subfolder)
    except EntryNotFoundError:
        raise HubError(
            f"{source}: branch '{branch}' has no folder '{source.subfolder}'; remove or rename that branch, or point at the right folder"
        ) from None


def _branch_kind(source: HubSource, branch: str, folder: str, paths: list[str]) -> str:
    """LoRA when a branch holds adapter files; full-parameter when its folder is a model folder."""
    prefix = f"{folder}/" if folder else ""
    names = [path[len(prefix) :] for path in paths]
    if any(_WEIGHT_FILE.fullmatch(name.rsplit("/", 1)[-1]) for name in names) or ADAPTER_CONFIG_NAME in names:
        return KIND_LORA
    if any(_MODEL_WEIGHTS.fullmatch(name) for name in names):
        return KIND_FULL
    binaries = [name for name in names if _BIN_WEIGHTS.fullmatch(name)]
    if binaries:
        raise HubError(_bin_only(source, f"branch '{branch}'", f"{prefix}{binaries[0]}"))
    nested = sorted({name.rsplit("/", 1)[0] for name in names if "/" in name and _MODEL_WEIGHTS.fullmatch(name.rsplit("/", 1)[1])})
    if nested:
        where = f"{prefix}{nested[0]}"
        raise HubError(
            f"{source}: branch '{branch}' holds its model in '{where}', not in '{folder or '/'}'; "
            f"point at it with hf://{source.repo_id}/{where}"
        )
    return KIND_LORA  # the download then says that the branch holds no weights


def _bin_only(source: HubSource, where: str, path: str) -> str:
    return (
        f"{source}: {where} holds only torch pickle weights ({path}); full-parameter trajectories are read from "
        "safetensors: re-save each checkpoint with save_pretrained(..., safe_serialization=True) and push it again"
    )


def _step_index(parts: list[str], depth: int, pattern: re.Pattern[str]) -> int | None:
    return next((i for i in range(depth, len(parts) - 1) if pattern.fullmatch(parts[i])), None)


def _steps_parent(files: list[str], source: HubSource) -> tuple[str, str]:
    """The kind of the steps and the one folder whose step-named subfolders hold them.

    LoRA steps are folders with adapter weights at any depth; full-parameter steps are step
    folders holding model weights directly and no ``adapter_config.json``.
    """
    depth = len(source.subfolder.split("/")) if source.subfolder else 0
    lora, full, binaries = set(), set(), []
    adapter_folders = {path.rsplit("/", 1)[0] for path in files if path.endswith(f"/{ADAPTER_CONFIG_NAME}")}
    for path in files:
        parts = path.split("/")
        if _WEIGHT_FILE.fullmatch(parts[-1]):
            step_index = _step_index(parts, depth, _STEP_FOLDER)
            if step_index is not None:
                lora.add("/".join(parts[:step_index]))
        elif len(parts) - 2 >= depth and STEP_DIR.fullmatch(parts[-2]) and "/".join(parts[:-1]) not in adapter_folders:
            if _MODEL_WEIGHTS.fullmatch(parts[-1]):
                full.add("/".join(parts[:-2]))
            elif _BIN_WEIGHTS.fullmatch(parts[-1]):
                binaries.append(path)
    parents = lora | full
    if not parents and binaries:
        raise HubError(_bin_only(source, "its step folders", binaries[0]))
    if not parents:
        branches = "no step branches (step_N, checkpoint-N, ...) and " if source.revision is None else ""
        raise HubError(
            f"{source}: {branches}no step-named folders holding adapter weights or model.safetensors; point at the folder "
            f"holding checkpoint-N/ folders with {SOURCE_SYNTAX}"
        )
    if len(parents) > 1:
        listed = ", ".join(sorted(p or "/" for p in parents))
        raise HubError(f"{source}: step folders sit under several folders ({listed}); pick one with {SOURCE_SYNTAX}")
    parent = parents.pop()
    return (KIND_LORA if parent in lora else KIND_FULL), parent


def _allow_patterns(folder: str, include_trainer_state: bool) -> list[str]:
    """``snapshot_download`` patterns for the files reading needs, at any depth under ``folder``."""
    names = _ADAPTER_FILES + (_TRAINER_STATE_FILES if include_trainer_state else ())
    prefix = f"{folder}/" if folder else ""
    return [f"{prefix}{anywhere}{name}" for name in names for anywhere in ("", "*/")]


def _download(
    source: HubSource, name: str, commit: str, folder: str, patterns: list[str], *, token: str | None, offline: bool, progress: bool
) -> Path:
    """Fetch one revision's files into the HF cache; the folder holding its steps (or its adapter)."""
    snapshot = snapshot_download(
        source.repo_id,
        revision=commit,
        allow_patterns=patterns,
        token=token,
        local_files_only=offline,
        tqdm_class=None if progress else _SilentTqdm,
    )
    target = Path(snapshot, folder)
    if not target.is_dir() or not any(_WEIGHT_FILE.fullmatch(p.name) for p in target.rglob("*")):
        where = f" under '{folder}'" if folder else ""
        raise HubError(
            f"{source}: revision '{name}' ({commit[:8]}) holds no adapter weights{where}; "
            "remove or rename that branch, or point at the right folder"
        )
    return target


# --------------------------------------------------------------------------- full-parameter downloads


def _is_model_file(name: str, include_trainer_state: bool) -> bool:
    """A file a model folder needs for reading (weights, index, config, tokenizer), or trainer state on request."""
    if _MODEL_WEIGHTS.fullmatch(name):
        return True
    if name in _TRAINER_JSON:
        return include_trainer_state
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _MODEL_FILES)


def _model_folder_files(source: HubSource, folder: str, listing: list[tuple[str, int]], state: bool = False) -> list[tuple[str, int]]:
    """The files to fetch of one model folder (``folder`` in the repo); refuses one without safetensors weights."""
    prefix = f"{folder}/" if folder else ""
    inside = [(path, size) for path, size in listing if path.startswith(prefix)]
    direct = [(path, size) for path, size in inside if "/" not in path[len(prefix) :]]
    if not any(_MODEL_WEIGHTS.fullmatch(path[len(prefix) :]) for path, _ in direct):
        binaries = [path for path, _ in direct if _BIN_WEIGHTS.fullmatch(path[len(prefix) :])]
        if binaries:
            raise HubError(_bin_only(source, f"'{folder or '/'}'", binaries[0]))
        raise HubError(
            f"{source}: no model.safetensors or model.safetensors.index.json in '{folder or '/'}'; point at a Hugging Face "
            f"model folder with {SOURCE_SYNTAX}"
        )
    if state:
        return inside  # everything the trainer may resume from, so the no-silent-loss check sees it
    return [(path, size) for path, size in direct if _is_model_file(path[len(prefix) :], False)]


def _step_model_files(source: HubSource, layout: _Layout, name: str, include_trainer_state: bool, steps: bool) -> list[tuple[str, int]]:
    """The files to fetch of one revision: its step folders' model files (or the one model folder)."""
    listing = layout.files.get(name)
    if listing is None:
        raise HubError(f"{source}: the local record lacks the file list of '{name}'; run once online to refresh it")
    if layout.on_branches or not steps:
        where = f"branch '{name}'" if layout.on_branches else None
        try:
            return _model_folder_files(source, layout.folder, listing, include_trainer_state)
        except HubError as error:
            if where is None:
                raise
            raise HubError(f"{error} ({where}: remove or rename that branch)") from None
    prefix = f"{layout.folder}/" if layout.folder else ""
    step_folders = sorted(
        {
            path[len(prefix) :].split("/", 1)[0]
            for path, _ in listing
            if path.startswith(prefix) and _MODEL_WEIGHTS.fullmatch(path[len(prefix) :].split("/", 1)[-1])
        }
    )
    files = []
    for step_folder in step_folders:
        if STEP_DIR.fullmatch(step_folder):
            files += _model_folder_files(source, f"{prefix}{step_folder}", listing, include_trainer_state)
    return files


class _FileProgress:
    """One file's progress for ``hf_hub_download`` (passed as its bar class), added to one shared bar."""

    def __init__(self, bar: hf_tqdm, lock: threading.Lock) -> None:
        self.bar, self.lock, self.count = bar, lock, 0

    def __call__(self, **kwargs: object) -> _FileProgress:
        """``hf_hub_download`` makes its bar by calling the class it was given."""
        self.update(kwargs.get("initial") or 0)  # type: ignore[arg-type]
        return self

    def __enter__(self) -> _FileProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int | float | None = 1) -> None:
        with self.lock:
            self.count += int(n or 0)
            self.bar.update(int(n or 0))

    def close(self) -> None:
        return None

    def finish(self, size: int) -> None:
        """Count the whole file (a cached file was never downloaded)."""
        self.update(size - self.count)


def _download_models(
    source: HubSource,
    layout: _Layout,
    include_trainer_state: bool,
    *,
    token: str | None,
    offline: bool,
    progress: bool,
    steps: bool = True,
) -> dict[str, Path]:
    """Fetch every revision's model files into the HF cache (one byte bar); the folder holding its steps (or model)."""
    wanted = {name: _step_model_files(source, layout, name, include_trainer_state, steps) for name in layout.commits}
    total = sum(size for files in wanted.values() for _, size in files)
    lock = threading.Lock()
    desc = f"{source}: {sum(map(len, wanted.values()))} files"
    with hf_tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:

        def fetch(name: str, path: str, size: int) -> Path:
            file_progress = _FileProgress(bar, lock)
            local = hf_hub_download(
                source.repo_id,
                filename=path,
                revision=layout.commits[name],
                token=token,
                local_files_only=offline,
                tqdm_class=file_progress,  # type: ignore[arg-type]  # called like a bar class
            )
            file_progress.finish(size)
            return Path(local).parents[len(path.split("/")) - 1]  # the snapshot folder of that commit

        with ThreadPoolExecutor(max_workers=_MAX_WORKERS) as pool:
            futures = {name: [pool.submit(fetch, name, path, size) for path, size in files] for name, files in wanted.items()}
            try:
                snapshots = {name: {future.result() for future in group} for name, group in futures.items()}
            except BaseException:
                pool.shutdown(cancel_futures=True)  # one failure (or Ctrl-C) stops the queued downloads
                raise
    return {name: Path(next(iter(found)), layout.folder) for name, found in snapshots.items() if found}


# --------------------------------------------------------------------------- local run folder


def _nextoffline_home() -> Path:
    return Path(constants.HF_HOME) / "nextoffline"


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _record_path(source: HubSource, purpose: str = "run") -> Path:
    """Where the last online discovery of ``source`` (as a run, or as one ``model``) is kept, for offline use."""
    key = [source.revision, source.subfolder] + ([purpose] if purpose != "run" else [])
    name = f"{source.repo_id.replace('/', '--')}--{_digest(key)}.json"
    return _nextoffline_home() / "sources" / name


def _recorded_layout(source: HubSource, purpose: str = "run") -> _Layout:
    path = _record_path(source, purpose)
    if not path.is_file():
        raise HubError(
            f"{source}: not in the local cache and HF_HUB_OFFLINE is set; run once online to fill the cache, or unset HF_HUB_OFFLINE"
        )
    return _Layout(**json.loads(path.read_text(encoding="utf-8")))


def _assemble(source: HubSource, layout: _Layout, targets: dict[str, Path]) -> Path:
    """Build the run folder from relative symlinks into the cache, atomically.

    Its name is a digest of the commits and folders it links to, so an existing one is the same
    and is kept (several ``torchrun`` ranks may assemble it at once).
    """
    runs = _nextoffline_home() / "runs"
    run = runs / f"{source.repo_id.replace('/', '--')}--{_digest([source.revision, source.subfolder, asdict(layout)])}"
    if run.exists():
        return run
    staging = runs / f".{run.name}.{os.getpid()}.tmp"
    _remove(staging)
    runs.mkdir(parents=True, exist_ok=True)
    if layout.on_branches:
        staging.mkdir()
        for name, target in targets.items():
            (staging / name).symlink_to(os.path.relpath(target, staging), target_is_directory=True)
    else:
        (target,) = targets.values()
        staging.symlink_to(os.path.relpath(target, runs), target_is_directory=True)
    _remove(run)  # a dangling link
    try:
        os.replace(staging, run)
    except OSError:
        if not run.exists():
            raise
        _remove(staging)  # another process assembled it meanwhile
    return run


def _remove(path: Path) -> None:
    """Delete a run folder (symlinks only, never their targets) or a link."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(staging, path)


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def _hub_errors(target: str) -> Iterator[None]:
    """Turn ``huggingface_hub`` and network failures into a one-line :class:`HubError` about ``target``."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        advice = _advice(error)
        if advice is None:
            raise
        raise HubError(f"{target}: {advice}") from error


def _advice(error: Exception) -> str | None:
    """What went wrong and what to do, in one line; ``None`` for errors that are not the Hub's."""
    if isinstance(error, GatedRepoError):
        return "the repo is gated: accept its conditions on the Hub with your account, then pass --token or set HF_TOKEN"
    if isinstance(error, RepositoryNotFoundError):
        return "repository not found, or private and not readable with your token: check the name, or pass --token or set HF_TOKEN"
    if isinstance(error, RevisionNotFoundError):
        return "revision not found: check the branch name or commit id"
    if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        if isinstance(error.__cause__, httpx2.TransportError):
            return _unreachable(error.__cause__)
        return "not (fully) in the local cache and HF_HUB_OFFLINE is set; run once online to fill the cache, or unset HF_HUB_OFFLINE"
    if isinstance(error, EntryNotFoundError):
        return "no such file or folder in the repo: check the subfolder"
    if isinstance(error, HfHubHTTPError):
        return _http_advice(error)
    if isinstance(error, httpx2.TransportError):
        return _unreachable(error)
    if isinstance(error, HFValidationError):
        return f"invalid repo id or revision ({_first_line(str(error))})"
    return None


def _http_advice(error: HfHubHTTPError) -> str:
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return "authentication failed (missing or invalid token): pass --token or set HF_TOKEN to a valid token"
    if status == 403:
        return "access denied: your token lacks the permission (pushing needs write access); pass --token or set HF_TOKEN"
    detail = _first_line(error.server_message or str(error))
    return f"the Hub answered HTTP {status} ({detail}); retry later or check HF_ENDPOINT"


def _unreachable(error: Exception) -> str:
    return (
        f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}); check HF_ENDPOINT and the "
        "network, or set HF_HUB_OFFLINE=1 to use the local cache"
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no detail"
