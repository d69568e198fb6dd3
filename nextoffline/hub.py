"""Hugging Face Hub sources (``hf://owner/repo[@revision][/subfolder]``) and pushes.

The only module of the package that talks to the Hub. A Hub source becomes a LOCAL run folder
that the same code that reads local runs reads unchanged:

* **steps on branches**: when no revision is given and the repo has branches named like step
  folders (``step_N``, ``step-N``, ``checkpoint-N``, ``global_step_N``, ``global_stepN``,
  ``iter_N``), each branch holds one step's adapter (at its root or under the subfolder); the
  run folder gets one ``<branch>/`` link per branch.
* **steps in folders**: otherwise, one revision (default ``main``) holds step-named folders
  (nesting such as ``global_step_10/actor/lora_adapter/`` is fine), possibly below some folder
  that is found automatically; the run folder is a link to that folder.

Only what reading needs is downloaded (adapter weights and small JSON configs; trainer state
such as optimizer shards only on request), through ``snapshot_download`` into the normal HF
cache. The run folder is made of relative symlinks into the cache and lives in
``$HF_HOME/nextoffline/runs/``. The commits each step came from are recorded in
``$HF_HOME/nextoffline/sources/`` so that ``HF_HUB_OFFLINE=1`` works from a warm cache, where
branches cannot be listed.

Settings (``HF_ENDPOINT``, ``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ...) are those of
``huggingface_hub``, read by it when it is imported. Every Hub failure becomes a one-line
:class:`~nextoffline.errors.HubError` that names the repo and says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, RepoFile, constants, parse_hf_uri, snapshot_download
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

__all__ = ["HubSource", "is_hub_source", "materialize_source", "parse_hub_source", "push_folder"]

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


def materialize_source(spec: str, *, token: str | None = None, include_trainer_state: bool = False, progress: bool = True) -> Path:
    """Make a Hub trajectory available as a local run folder and return its path.

    Args:
        spec: ``hf://owner/repo[@revision][/subfolder]``.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.
        include_trainer_state: Also download optimizer, scheduler, RNG and other trainer state
            (needed to write a resumable checkpoint).
        progress: Show ``huggingface_hub``'s download progress bars.

    Returns:
        A folder under ``$HF_HOME/nextoffline/runs/`` whose step-named subfolders hold the
        downloaded files (symlinks into the HF cache).

    Raises:
        HubError: The repo, revision or subfolder is unknown or not accessible, it holds no
            steps, the Hub is unreachable, or it is offline with a cold cache.

    Example:
        >>> run = materialize_source("hf://me/grpo-run")  # doctest: +SKIP
        >>> sorted(p.name for p in run.iterdir())  # doctest: +SKIP
        ['checkpoint-10', 'checkpoint-20', 'checkpoint-30']
    """
    source = parse_hub_source(spec)
    offline = constants.is_offline_mode()
    with _hub_errors(str(source)):
        layout = _recorded_layout(source) if offline else _discover(HfApi(token=token), source)
        patterns = _allow_patterns(layout.folder, include_trainer_state)
        targets = {
            name: _download(source, name, commit, layout.folder, patterns, token=token, offline=offline, progress=progress)
            for name, commit in layout.commits.items()
        }
    if not offline:
        _write_json(_record_path(source), asdict(layout))
    run = _assemble(source, layout, targets)
    LOG.info(
        "%s: %d revision(s) %s, available at %s",
        source,
        len(targets),
        "as step branches" if layout.on_branches else f"with step folders under '{layout.folder or '/'}'",
        run,
    )
    return run


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


def _discover(api: HfApi, source: HubSource) -> _Layout:
    """Find the steps online: step branches first, else step folders in one revision."""
    if source.revision is None:
        branches = api.list_repo_refs(source.repo_id).branches
        steps = {ref.name: ref.target_commit for ref in branches if _STEP_BRANCH.fullmatch(ref.name)}
        if steps:
            return _Layout(on_branches=True, commits=dict(sorted(steps.items())), folder=source.subfolder or "")
    revision = source.revision or DEFAULT_REVISION
    commit = api.repo_info(source.repo_id, revision=revision).sha
    if commit is None:
        raise HubError(f"{source}: the Hub did not report the commit of '{revision}'; check that HF_ENDPOINT is a Hub")
    entries = api.list_repo_tree(source.repo_id, path_in_repo=source.subfolder, recursive=True, revision=commit)
    files = [entry.path for entry in entries if isinstance(entry, RepoFile)]
    return _Layout(on_branches=False, commits={revision: commit}, folder=_steps_parent(files, source))


def _steps_parent(files: list[str], source: HubSource) -> str:
    """The one folder whose step-named subfolders hold adapter weights."""
    depth = len(source.subfolder.split("/")) if source.subfolder else 0
    parents = set()
    for path in files:
        parts = path.split("/")
        if not _WEIGHT_FILE.fullmatch(parts[-1]):
            continue
        step_index = next((i for i in range(depth, len(parts) - 1) if _STEP_FOLDER.fullmatch(parts[i])), None)
        if step_index is not None:
            parents.add("/".join(parts[:step_index]))
    if not parents:
        branches = "no step branches (step_N, checkpoint-N, ...) and " if source.revision is None else ""
        raise HubError(
            f"{source}: {branches}no step-named folders holding adapter weights; point at the folder "
            f"holding checkpoint-N/ folders with {SOURCE_SYNTAX}"
        )
    if len(parents) > 1:
        listed = ", ".join(sorted(p or "/" for p in parents))
        raise HubError(f"{source}: step folders sit under several folders ({listed}); pick one with {SOURCE_SYNTAX}")
    return parents.pop()


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


# --------------------------------------------------------------------------- local run folder


def _nextoffline_home() -> Path:
    return Path(constants.HF_HOME) / "nextoffline"


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _record_path(source: HubSource) -> Path:
    """Where the last online discovery of ``source`` is kept, for offline use."""
    name = f"{source.repo_id.replace('/', '--')}--{_digest([source.revision, source.subfolder])}.json"
    return _nextoffline_home() / "sources" / name


def _recorded_layout(source: HubSource) -> _Layout:
    path = _record_path(source)
    if not path.is_file():
        raise HubError(
            f"{source}: not in the local cache and HF_HUB_OFFLINE is set; run once online to fill the cache, or unset HF_HUB_OFFLINE"
        )
    return _Layout(**json.loads(path.read_text(encoding="utf-8")))


def _assemble(source: HubSource, layout: _Layout, targets: dict[str, Path]) -> Path:
    """Build the run folder from relative symlinks into the cache (replacing an older one atomically)."""
    runs = _nextoffline_home() / "runs"
    run = runs / f"{source.repo_id.replace('/', '--')}--{_digest([source.revision, source.subfolder, asdict(layout)])}"
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
    _remove(run)
    os.replace(staging, run)
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
