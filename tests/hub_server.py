"""A local Hugging Face Hub look-alike for tests (standard library only).

Run as ``python tests/hub_server.py --host 127.0.0.1 --port 0 --root DIR --token hf_test``.
It prints one line, ``READY <endpoint>``, once it accepts connections; point the unmodified
``huggingface_hub`` client at it with ``HF_ENDPOINT=<endpoint>``.

It serves the part of the Hub HTTP API that ``huggingface_hub`` uses to create repos and
branches, list refs, trees and commits, read repo info, download files (``resolve``) and
commit (``preupload``, the NDJSON ``commit`` endpoint, and Git LFS with the ``basic``
transfer). As on the Hub, LFS objects are served from and uploaded to a separate origin (a
second port standing in for the CDN / S3) through signed URLs that carry no token.

Storage under ``--root`` is git-like: per repo, a ``repo.json`` (visibility, gating, branch
heads), one JSON file per commit (parent, message, full file tree) and content-addressed
``blobs/`` (regular files, by git blob id) and ``lfs/`` (LFS objects, by sha256).

Xet storage is not offered: the server never sends ``X-Xet-Hash`` / ``xetHash``, so downloads
use plain HTTP. Uploads go through Xet whenever ``hf_xet`` is installed, a choice the client
makes on its own, so clients must run with ``HF_HUB_DISABLE_XET=1``; the Xet token endpoints
answer 400 saying so.

Tokens are given as ``TOKEN[:USER[:ROLE]]`` (ROLE ``read`` or ``write``, default ``write``).
A user owns the namespace of its name. Not implemented: organisations, tags, pull requests,
spaces, pagination (one page), ``expand``, ``.gitignore``, YAML validation of model cards.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

REGULAR_FILE_MAX_SIZE = 10 * 1000 * 1000  # larger files must go through LFS, as on the Hub
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.gguf",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)
_KIND = r"(?P<kind>models|datasets)"
_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = r"(?:(?P<kind>datasets)/)?" + _REPO
_REPO_NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")


class ApiError(Exception):
    """An error answer: HTTP status, optional ``X-Error-Code`` and a message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class Account:
    """The owner of a token."""

    name: str
    can_write: bool


@dataclass(frozen=True)
class RepoKey:
    """A repository: ``kind`` is ``models`` or ``datasets``."""

    kind: str
    repo_id: str

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def web_path(self) -> str:
        """The repo's path in web URLs (``ns/name`` or ``datasets/ns/name``)."""
        return self.repo_id if self.kind == "models" else f"{self.kind}/{self.repo_id}"


def repo_key(kind: str | None, namespace: str, name: str) -> RepoKey:
    """The repo named by a request; 400 for names the Hub refuses (this also keeps paths inside --root)."""
    if not (_REPO_NAME.fullmatch(namespace) and _REPO_NAME.fullmatch(name)):
        raise ApiError(400, f"Invalid repo id: {namespace}/{name}")
    return RepoKey(kind or "models", f"{namespace}/{name}")


def now_iso() -> str:
    """Current UTC time as the Hub writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------- storage


class Store:
    """Repos, commits and objects on disk; every mutation holds one lock."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()

    def _dir(self, key: RepoKey) -> Path:
        return self.root / "repos" / key.kind / key.repo_id

    def exists(self, key: RepoKey) -> bool:
        return (self._dir(key) / "repo.json").is_file()

    def repo(self, key: RepoKey) -> dict[str, Any]:
        return json.loads((self._dir(key) / "repo.json").read_text())

    def save_repo(self, key: RepoKey, repo: dict[str, Any]) -> None:
        _write_atomic(self._dir(key) / "repo.json", json.dumps(repo, indent=1).encode())

    def create_repo(self, key: RepoKey, *, private: bool, author: str) -> None:
        """A new repo whose ``main`` holds the initial commit with ``.gitattributes``."""
        self.save_repo(key, {"private": private, "gated": False, "created_at": now_iso(), "refs": {}})
        entry = self.put_regular(key, DEFAULT_GITATTRIBUTES.encode())
        self.add_commit(key, "main", None, {".gitattributes": entry}, "initial commit", "", author)

    def _commit_path(self, key: RepoKey, sha: str) -> Path:
        return self._dir(key) / "commits" / f"{sha}.json"

    def commit(self, key: RepoKey, sha: str) -> dict[str, Any]:
        return json.loads(self._commit_path(key, sha).read_text())

    def resolve(self, key: RepoKey, revision: str) -> str:
        """Commit id of a branch name or full commit id."""
        sha = self.repo(key)["refs"].get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{40}", revision) and self._commit_path(key, revision).is_file():
            sha = revision
        if sha is None:
            raise ApiError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def add_commit(self, key: RepoKey, branch: str, parent: str | None, tree: dict, title: str, message: str, author: str) -> str:
        """Store a commit and move ``branch`` to it."""
        body = {
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "date": now_iso(),
            "author": author,
            "tree": tree,
        }
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        _write_atomic(self._commit_path(key, sha), json.dumps({"id": sha, **body}).encode())
        self.set_ref(key, branch, sha)
        return sha

    def set_ref(self, key: RepoKey, branch: str, sha: str) -> None:
        repo = self.repo(key)
        repo["refs"][branch] = sha
        self.save_repo(key, repo)

    def put_regular(self, key: RepoKey, data: bytes) -> dict[str, Any]:
        """Store a regular file; returns its tree entry."""
        oid = git_blob_id(data)
        path = self._dir(key) / "blobs" / oid
        if not path.exists():
            _write_atomic(path, data)
        return {"oid": oid, "size": len(data), "lfs": None}

    def regular_path(self, key: RepoKey, oid: str) -> Path:
        return self._dir(key) / "blobs" / oid

    def lfs_path(self, key: RepoKey, oid: str) -> Path:
        return self._dir(key) / "lfs" / oid

    def lfs_entry(self, key: RepoKey, oid: str) -> dict[str, Any] | None:
        """Tree entry of an uploaded LFS object, or ``None`` when it is not stored."""
        path = self.lfs_path(key, oid)
        if not path.is_file():
            return None
        size = path.stat().st_size
        pointer = LFS_POINTER.format(oid=oid, size=size).encode()
        return {"oid": git_blob_id(pointer), "size": size, "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)}}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tree helpers


def tree_listing(tree: dict[str, dict], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Hub tree listing of ``folder`` (``""`` for the root): files and directories."""
    prefix = f"{folder}/" if folder else ""
    below = {p: e for p, e in tree.items() if p.startswith(prefix)}
    if folder and not below:
        raise ApiError(404, f"{folder} does not exist on this revision", "EntryNotFound")
    dirs: set[str] = set()
    files = []
    for path, entry in below.items():
        parts = path[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(min(depth, len(parts) - 1)))
        if recursive or len(parts) == 1:
            files.append(_file_item(path, entry))
    folders = [{"type": "directory", "oid": _tree_id(tree, d), "size": 0, "path": d} for d in sorted(dirs)]
    return folders + sorted(files, key=lambda item: item["path"])


def _file_item(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        item["lfs"] = entry["lfs"]
    return item


def _tree_id(tree: dict[str, dict], folder: str) -> str:
    listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(tree.items()) if p.startswith(folder + "/"))
    return hashlib.sha1(listing.encode()).hexdigest()


def is_lfs_path(gitattributes: str, path: str) -> bool:
    """True when a ``filter=lfs`` line of ``.gitattributes`` matches ``path``."""
    for line in gitattributes.splitlines():
        pattern, _, attributes = line.partition(" ")
        if "filter=lfs" not in attributes:
            continue
        target = path if "/" in pattern else path.rsplit("/", 1)[-1]
        if fnmatch.fnmatchcase(target, pattern):
            return True
    return False


def check_repo_path(path: str) -> str:
    """A clean relative path inside a repo, or a 400."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise ApiError(400, f"Invalid path in repo: {path!r}")
    return path


# --------------------------------------------------------------------------- the application


class HubApp:
    """State shared by the Hub handler and the LFS storage handler."""

    def __init__(self, store: Store, tokens: dict[str, Account]):
        self.store = store
        self.tokens = tokens
        self.secret = secrets.token_bytes(32)
        self.storage_port = 0

    def sign(self, key: RepoKey, oid: str, action: str) -> str:
        message = f"{action}:{key.kind}/{key.repo_id}:{oid}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def storage_url(self, host: str, key: RepoKey, oid: str, action: str) -> str:
        """Signed URL of an LFS object on the storage origin (the Hub's CDN / S3 stand-in)."""
        hostname = host.rsplit(":", 1)[0]
        return f"http://{hostname}:{self.storage_port}/lfs/{key.kind}/{key.repo_id}/{oid}?{action}=1&sig={self.sign(key, oid, action)}"


Route = tuple[str, re.Pattern[str], Callable[..., None]]


class BaseHandler(BaseHTTPRequestHandler):
    """Request plumbing: body reading (incl. chunked), JSON answers, error answers."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the delayed-ACK stall
    routes: list[Route] = []
    server: AppServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    @property
    def app(self) -> HubApp:
        return self.server.app

    def _dispatch(self, method: str) -> None:
        self.body = self._read_body()
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            for verbs, pattern, handler in self.routes:
                match = pattern.fullmatch(url.path)
                if match and method in verbs.split("|"):
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    handler(self, **groups)
                    return
            raise ApiError(404, f"Not found: {method} {url.path}")
        except (KeyError, TypeError, ValueError) as error:  # malformed payloads
            self._send_error(ApiError(400, f"Malformed request: {error!r}"))
        except ApiError as error:
            self._send_error(error)

    def _send_error(self, error: ApiError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self.send_json({"error": error.message}, error.status, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise ApiError(400, "Request body is not valid JSON") from None

    def send_json(
        self, payload: Any, status: int = 200, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        self.send_bytes(json.dumps(payload).encode(), status, {"Content-Type": content_type, **(headers or {})})

    def send_bytes(self, data: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_content(self, data: bytes, headers: dict[str, str]) -> None:
        """A file body, honouring a single ``Range: bytes=start-[end]`` request."""
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        base = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        if not match or not (match[1] or match[2]):
            self.send_bytes(data, 200, base)
            return
        start, end = (int(match[1]), int(match[2] or len(data) - 1)) if match[1] else (len(data) - int(match[2]), len(data) - 1)
        if start >= len(data) or start > end:
            raise ApiError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        end = min(end, len(data) - 1)
        self.send_bytes(data[start : end + 1], 206, {**base, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def host(self) -> str:
        """``host:port`` the client used to reach this server."""
        return self.headers.get("Host") or f"{self.server.server_address[0]!s}:{self.server.server_port}"

    def base_url(self) -> str:
        return f"http://{self.host()}"


class HubHandler(BaseHandler):
    """The Hub API and file resolution."""

    # --- auth

    def caller(self) -> Account | None:
        """The token's account, ``None`` when anonymous; an unknown token is refused on every route."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        account = self.app.tokens.get(token)
        if account is None:
            raise ApiError(401, "Invalid credentials in Authorization header")
        return account

    def readable(self, kind: str | None, ns: str, name: str) -> tuple[RepoKey, dict[str, Any]]:
        """A repo the caller may read; hidden (401 anonymous, 404 signed in) otherwise, like the Hub."""
        key = repo_key(kind, ns, name)
        account = self.caller()
        repo = self.app.store.repo(key) if self.app.store.exists(key) else None
        if repo is None or (repo["private"] and (account is None or account.name != key.namespace)):
            raise ApiError(401 if account is None else 404, "Repository not found", "RepoNotFound")
        return key, repo

    def writable(self, kind: str | None, ns: str, name: str) -> tuple[RepoKey, dict[str, Any], Account]:
        key, repo = self.readable(kind, ns, name)
        return key, repo, self.writer(key.namespace)

    def writer(self, namespace: str) -> Account:
        """The caller, who must hold a write token for ``namespace``."""
        account = self.caller()
        if account is None:
            raise ApiError(401, "Invalid username or password.")
        if account.name != namespace or not account.can_write:
            raise ApiError(403, f"You don't have the rights to write to {namespace}: use a write token of {namespace}")
        return account

    def check_gate(self, key: RepoKey, repo: dict[str, Any]) -> None:
        account = self.caller()
        if repo["gated"] and (account is None or account.name != key.namespace):
            message = (
                f"Access to model {key.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.base_url()}/{key.web_path()} to ask for access."
            )
            raise ApiError(401 if account is None else 403, message, "GatedRepo")

    # --- account and repos

    def whoami(self) -> None:
        account = self.caller()
        if account is None:
            raise ApiError(401, "Invalid credentials in Authorization header")
        role = "write" if account.can_write else "read"
        self.send_json(
            {
                "type": "user",
                "id": account.name,
                "name": account.name,
                "fullname": account.name,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            }
        )

    def create_repo(self) -> None:
        payload = self.json_body()
        kind = {"model": "models", "dataset": "datasets", None: "models"}.get(payload.get("type"))
        if kind is None:
            raise ApiError(400, f"Repo type {payload.get('type')!r} is not supported by this test server")
        account = self.caller()
        namespace = payload.get("organization") or (account.name if account else "")
        key = repo_key(kind, namespace, str(payload.get("name")))
        self.writer(namespace)
        url = f"{self.base_url()}/{key.web_path()}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        with self.app.store.lock:
            exists = self.app.store.exists(key)
            if not exists:
                self.app.store.create_repo(key, private=private, author=namespace)
        if exists:  # the Hub answers 409 with the url, which `create_repo(exist_ok=True)` reads
            message = "You already created this model repo"
            self.send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})
            return
        self.send_json({"url": url, "name": key.repo_id, "id": key.repo_id})

    def update_settings(self, kind: str, ns: str, name: str) -> None:
        key, repo, _ = self.writable(kind, ns, name)
        payload = self.json_body()
        with self.app.store.lock:
            repo = self.app.store.repo(key)
            if "gated" in payload:
                repo["gated"] = payload["gated"]
            if "visibility" in payload:
                repo["private"] = payload["visibility"] == "private"
            self.app.store.save_repo(key, repo)
        self.send_json({})

    def repo_info(self, kind: str, ns: str, name: str, rev: str | None) -> None:
        key, repo = self.readable(kind, ns, name)
        sha = self.app.store.resolve(key, rev or "main")
        commit = self.app.store.commit(key, sha)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        self.send_json(
            {
                "_id": key.repo_id,
                "id": key.repo_id,
                "author": key.namespace,
                "sha": sha,
                "lastModified": commit["date"],
                "createdAt": repo["created_at"],
                "private": repo["private"],
                "gated": repo["gated"],
                "disabled": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [_sibling(p, e, with_blobs) for p, e in sorted(commit["tree"].items())],
            }
        )

    def list_refs(self, kind: str, ns: str, name: str) -> None:
        _, repo = self.readable(kind, ns, name)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(repo["refs"].items())]
        self.send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def create_branch(self, kind: str, ns: str, name: str, branch: str) -> None:
        key, _repo, _ = self.writable(kind, ns, name)
        start = self.json_body().get("startingPoint") or "main"
        with self.app.store.lock:
            if branch in self.app.store.repo(key)["refs"]:
                raise ApiError(409, "Reference already exists")
            self.app.store.set_ref(key, branch, self.app.store.resolve(key, start))
        self.send_json({})

    def list_tree(self, kind: str, ns: str, name: str, rev: str, path: str | None) -> None:
        key, _ = self.readable(kind, ns, name)
        commit = self.app.store.commit(key, self.app.store.resolve(key, rev))
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        self.send_json(tree_listing(commit["tree"], (path or "").strip("/"), recursive))

    def list_commits(self, kind: str, ns: str, name: str, rev: str) -> None:
        key, _ = self.readable(kind, ns, name)
        sha: str | None = self.app.store.resolve(key, rev)
        history = []
        while sha:
            commit = self.app.store.commit(key, sha)
            history.append(
                {
                    "id": sha,
                    "title": commit["title"],
                    "message": commit["message"],
                    "date": commit["date"],
                    "authors": [{"user": commit["author"]}],
                }
            )
            sha = (commit["parents"] or [None])[0]
        self.send_json(history)

    # --- uploads

    def preupload(self, kind: str, ns: str, name: str, rev: str) -> None:
        key, _, _ = self.writable(kind, ns, name)
        tree = self.app.store.commit(key, self.app.store.resolve(key, rev))["tree"]
        gitattributes = self._gitattributes(key, tree)
        answers = []
        for item in self.json_body().get("files", []):
            path = check_repo_path(item["path"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = item["size"] > REGULAR_FILE_MAX_SIZE or b"\0" in sample or is_lfs_path(gitattributes, path)
            existing = tree.get(path)
            oid = None if existing is None else (existing["lfs"]["oid"] if existing["lfs"] else existing["oid"])
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self.send_json({"files": answers})

    def _gitattributes(self, key: RepoKey, tree: dict[str, dict]) -> str:
        entry = tree.get(".gitattributes")
        return self.app.store.regular_path(key, entry["oid"]).read_text() if entry and not entry["lfs"] else ""

    def commit(self, kind: str, ns: str, name: str, rev: str) -> None:
        key, _repo, account = self.writable(kind, ns, name)
        if "create_pr" in self.query:
            raise ApiError(400, "Pull requests are not supported by this test server")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise ApiError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self.app.store.lock:
            if rev not in self.app.store.repo(key)["refs"]:
                self.app.store.resolve(key, rev)  # 404 RevisionNotFound for an unknown name
                raise ApiError(400, f"Commits can only be pushed to a branch, not to {rev}")
            parent = self.app.store.resolve(key, rev)
            if header.get("parentCommit") not in (None, parent):
                raise ApiError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(self.app.store.commit(key, parent)["tree"])
            for line in lines[1:]:
                self._apply(key, tree, line["key"], line["value"])
            sha = self.app.store.add_commit(key, rev, parent, tree, header.get("summary", ""), header.get("description", ""), account.name)
        self.send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.base_url()}/{key.web_path()}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _apply(self, key: RepoKey, tree: dict[str, dict], op: str, value: dict[str, Any]) -> None:
        """Apply one NDJSON commit operation to ``tree``."""
        path = check_repo_path(value.get("path", "").rstrip("/"))
        if op == "file":
            try:
                data = base64.b64decode(value["content"], validate=True)
            except (KeyError, binascii.Error):
                raise ApiError(400, f"{path}: content must be base64") from None
            if len(data) > REGULAR_FILE_MAX_SIZE:
                raise ApiError(400, f"{path}: files larger than 10MB must be uploaded with LFS")
            tree[path] = self.app.store.put_regular(key, data)
        elif op == "lfsFile":
            entry = self.app.store.lfs_entry(key, value.get("oid", ""))
            if entry is None:
                raise ApiError(400, f"{path}: LFS object {value.get('oid')} was not uploaded to this repo")
            tree[path] = entry
        elif op == "deletedFile":
            if tree.pop(path, None) is None:
                raise ApiError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif op == "deletedFolder":
            for existing in [p for p in tree if p.startswith(path + "/")]:
                del tree[existing]
        else:
            raise ApiError(400, f"Unknown commit operation {op!r}")

    def lfs_batch(self, kind: str | None, ns: str, name: str) -> None:
        key, _, _ = self.writable(kind, ns, name)
        payload = self.json_body()
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise ApiError(400, "Only LFS uploads with the basic transfer are supported")
        verify = {"href": f"{self.base_url()}/{key.web_path()}.git/info/lfs/objects/verify"}
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}})
            elif self.app.store.lfs_entry(key, oid) is not None:
                objects.append({"oid": oid, "size": size})
            else:
                upload = {"href": self.app.storage_url(self.host(), key, oid, "upload")}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}})
        self.send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_verify(self, kind: str | None, ns: str, name: str) -> None:
        key, _, _ = self.writable(kind, ns, name)
        payload = self.json_body()
        entry = self.app.store.lfs_entry(key, str(payload.get("oid", "")))
        if entry is None or entry["size"] != payload.get("size"):
            raise ApiError(404, f"LFS object {payload.get('oid')} not found")
        self.send_json({})

    def validate_yaml(self) -> None:
        self.send_json({"errors": [], "warnings": []})

    def xet_token(self, **_: Any) -> None:
        raise ApiError(400, "This test server stores files with Git LFS only, not Xet: set HF_HUB_DISABLE_XET=1")

    # --- downloads

    def resolve(self, kind: str | None, ns: str, name: str, rev: str, path: str) -> None:
        key, repo = self.readable(kind, ns, name)
        self.check_gate(key, repo)
        sha = self.app.store.resolve(key, rev)
        entry = self.app.store.commit(key, sha)["tree"].get(path)
        if entry is None:
            raise ApiError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:
            oid = entry["lfs"]["oid"]
            headers.update(
                {
                    "Location": self.app.storage_url(self.host(), key, oid, "download"),
                    "X-Linked-Etag": f'"{oid}"',
                    "X-Linked-Size": str(entry["size"]),
                }
            )
            self.send_bytes(b"Found. Redirecting", 302, {"Content-Type": "text/plain", **headers})
            return
        data = self.app.store.regular_path(key, entry["oid"]).read_bytes()
        filename = path.rsplit("/", 1)[-1]
        headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\";"
        self.send_content(data, headers)

    routes: list[Route] = [
        ("GET", re.compile(r"/api/whoami-v2"), whoami),
        ("POST", re.compile(r"/api/repos/create"), create_repo),
        ("POST", re.compile(r"/api/validate-yaml"), validate_yaml),
        ("GET", re.compile(rf"/api/{_KIND}/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), repo_info),
        ("GET", re.compile(rf"/api/{_KIND}/{_REPO}/refs"), list_refs),
        ("GET", re.compile(rf"/api/{_KIND}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), list_tree),
        ("GET", re.compile(rf"/api/{_KIND}/{_REPO}/commits/(?P<rev>[^/]+)"), list_commits),
        ("POST", re.compile(rf"/api/{_KIND}/{_REPO}/branch/(?P<branch>[^/]+)"), create_branch),
        ("PUT", re.compile(rf"/api/{_KIND}/{_REPO}/settings"), update_settings),
        ("POST", re.compile(rf"/api/{_KIND}/{_REPO}/preupload/(?P<rev>[^/]+)"), preupload),
        ("POST", re.compile(rf"/api/{_KIND}/{_REPO}/commit/(?P<rev>[^/]+)"), commit),
        ("GET|POST", re.compile(rf"/api/{_KIND}/{_REPO}/xet-(?:read|write)-token(?:/.*)?"), xet_token),
        ("POST", re.compile(rf"/{_GIT_REPO}\.git/info/lfs/objects/batch"), lfs_batch),
        ("POST", re.compile(rf"/{_GIT_REPO}\.git/info/lfs/objects/verify"), lfs_verify),
        ("GET|HEAD", re.compile(rf"/{_GIT_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), resolve),
    ]


def _sibling(path: str, entry: dict[str, Any], with_blobs: bool) -> dict[str, Any]:
    if not with_blobs:
        return {"rfilename": path}
    lfs = entry["lfs"]
    return {
        "rfilename": path,
        "size": entry["size"],
        "blobId": entry["oid"],
        **({"lfs": {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}} if lfs else {}),
    }


class StorageHandler(BaseHandler):
    """The LFS object store on its own origin: signed URLs, no token (like the Hub's CDN / S3)."""

    def _signed(self, kind: str, repo_id: str, oid: str, action: str) -> RepoKey:
        key = RepoKey(kind, repo_id)
        if action not in self.query or not hmac.compare_digest(self.query.get("sig", ""), self.app.sign(key, oid, action)):
            raise ApiError(403, "Request has expired or the signature does not match")
        return key

    def upload(self, kind: str, repo_id: str, oid: str) -> None:
        key = self._signed(kind, repo_id, oid, "upload")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise ApiError(400, "The uploaded content does not match the object id")
        _write_atomic(self.app.store.lfs_path(key, oid), self.body)
        self.send_bytes(b"", 200, {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def download(self, kind: str, repo_id: str, oid: str) -> None:
        key = self._signed(kind, repo_id, oid, "download")
        path = self.app.store.lfs_path(key, oid)
        if not path.is_file():
            raise ApiError(404, "NoSuchKey")
        self.send_content(path.read_bytes(), {"ETag": f'"{oid}"'})

    _OBJECT = rf"/lfs/{_KIND}/(?P<repo_id>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{{64}})"
    routes: list[Route] = [
        ("PUT", re.compile(_OBJECT), upload),
        ("GET|HEAD", re.compile(_OBJECT), download),
    ]


class AppServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the shared :class:`HubApp`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHandler], app: HubApp):
        super().__init__(address, handler)
        self.app = app


def parse_token(spec: str) -> tuple[str, Account]:
    """``TOKEN[:USER[:ROLE]]`` -> (token, account)."""
    token, user, role = ([*spec.split(":"), "", ""])[:3]
    if role not in ("", "read", "write"):
        raise argparse.ArgumentTypeError(f"--token {spec}: ROLE must be read or write")
    return token, Account(user or "user", role != "read")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed in the READY line)")
    parser.add_argument("--storage-port", type=int, default=0, help="port of the LFS object origin (0: free port)")
    parser.add_argument("--root", type=Path, required=True, help="folder holding the repos")
    parser.add_argument("--token", action="append", default=[], type=parse_token, help="TOKEN[:USER[:ROLE]], repeatable")
    args = parser.parse_args(argv)
    app = HubApp(Store(args.root), dict(args.token))
    storage = AppServer((args.host, args.storage_port), StorageHandler, app)
    app.storage_port = storage.server_address[1]
    hub = AppServer((args.host, args.port), HubHandler, app)
    threading.Thread(target=storage.serve_forever, daemon=True).start()
    print(f"READY http://{args.host}:{hub.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        hub.serve_forever()


if __name__ == "__main__":
    main()
