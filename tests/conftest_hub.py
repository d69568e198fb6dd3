"""Pytest plugin: a local Hub (``tests/hub_server.py``) and a client environment pointing at it.

``hub_server`` (session) runs the server in a subprocess on 127.0.0.1 with a free port.
``hub_env`` (per test) points ``huggingface_hub`` at it with a fresh, empty ``HF_HOME``: both
the environment variables (for subprocesses) and ``huggingface_hub.constants`` (read once at
import time, so setting the variables alone does not reach an already imported client).
"""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from huggingface_hub import constants

SERVER_SCRIPT = Path(__file__).resolve().parent / "hub_server.py"
STARTUP_TIMEOUT_S = 30


USER, TOKEN, READ_TOKEN = "tester", "hf_test", "hf_test_read"
OTHER_USER, OTHER_TOKEN = "other", "hf_other"


@dataclass(frozen=True)
class HubServer:
    """A running local Hub: ``token`` writes to the ``user`` namespace."""

    endpoint: str
    root: Path
    token: str = TOKEN
    user: str = USER
    read_token: str = READ_TOKEN  # read-only token of ``user``
    other_token: str = OTHER_TOKEN  # write token of ``other_user``
    other_user: str = OTHER_USER


@dataclass
class HubEnv:
    """The client side of one test: where the cache lives, and an offline switch."""

    server: HubServer
    hf_home: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def cache_dir(self) -> Path:
        return self.hf_home / "hub"

    def set_offline(self, offline: bool = True) -> None:
        """Turn ``HF_HUB_OFFLINE`` on or off, for this process and its subprocesses."""
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")

    def set_endpoint(self, endpoint: str) -> None:
        """Point the client at another endpoint (e.g. one where nothing listens)."""
        for name, value in _endpoint_settings(endpoint).items():
            self.monkeypatch.setattr(constants, name, value)
        self.monkeypatch.setenv("HF_ENDPOINT", endpoint)


def _endpoint_settings(endpoint: str) -> dict[str, str]:
    return {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}"}


def _wait_ready(process: subprocess.Popen[str], stdout: IO[str], log: Path) -> str:
    """The endpoint from the server's ``READY <endpoint>`` line."""
    ready, _, _ = select.select([stdout], [], [], STARTUP_TIMEOUT_S)
    line = stdout.readline() if ready else ""
    if not line.startswith("READY "):
        process.kill()
        raise RuntimeError(f"hub_server did not start: {line!r}\n{log.read_text()}")
    return line.split()[1]


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A local Hub for the whole session; repos persist across tests, so give each test its own names."""
    root = tmp_path_factory.mktemp("hub_server")
    tokens = [f"{TOKEN}:{USER}", f"{READ_TOKEN}:{USER}:read", f"{OTHER_TOKEN}:{OTHER_USER}"]
    command = [sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0", "--root", str(root / "store")]
    command += [arg for token in tokens for arg in ("--token", token)]
    log = root / "server.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stdout = process.stdout
    assert stdout is not None  # stdout=PIPE
    try:
        yield HubServer(endpoint=_wait_ready(process, stdout, log), root=root / "store")
    finally:
        process.terminate()
        process.wait(timeout=10)
        stdout.close()


@pytest.fixture
def hub_env(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubEnv:
    """``huggingface_hub`` talking to ``hub_server``, online, anonymous by default, with an empty cache."""
    hf_home = tmp_path / "hf_home"
    settings = {
        **_endpoint_settings(hub_server.endpoint),
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,  # the client would upload through Xet otherwise; the server speaks LFS
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "HF_XET_CACHE",
        "HF_TOKEN_PATH",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        monkeypatch.setenv(name, value)
    return HubEnv(server=hub_server, hf_home=hf_home, monkeypatch=monkeypatch)
