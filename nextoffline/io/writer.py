"""Atomic, crash-safe output folders.

Outputs are assembled in a hidden temporary sibling (``.NAME.tmp-HOST-PID-XXXX``), every file
is fsynced, and the folder is renamed into place; replacing an existing folder
(``--overwrite``) is one atomic exchange where the OS offers it (Linux ``renameat2``). A run
killed at any moment leaves either the complete output or no output under the final name,
and an overwritten folder is either the old or the new one, never missing or mixed. A
SIGKILLed run can leave a hidden temporary folder; the next run writing the same ``--out``
removes those of dead processes. Folders created for ``--out``'s parents are removed again
when nothing is written. Any ``OSError`` while writing becomes an
:class:`~nextoffline.errors.OutputError` (one line, nothing written).

Testing hook: ``NEXTOFFLINE_TEST_WRITE_DELAY=SECONDS`` sleeps that long after every file
written and before the final rename, so crash-safety tests can kill a run mid-write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from nextoffline.errors import NextOfflineError, OutputError

__all__ = ["AtomicOutputDir", "check_output_location", "copy_file", "json_safe", "write_json", "write_safetensors", "write_text"]

LOG = logging.getLogger(__name__)

TEST_DELAY_ENV = "NEXTOFFLINE_TEST_WRITE_DELAY"


def _test_delay() -> None:
    """Testing hook (see the module docstring); a no-op unless the variable is set."""
    value = os.environ.get(TEST_DELAY_ENV)
    if value:
        with contextlib.suppress(ValueError):
            time.sleep(max(float(value), 0.0))


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _nearest_existing(path: Path) -> Path:
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_output_location(out_dir: Path, *, sources: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Validate an output folder before any work is done; returns its resolved path.

    Nothing is left behind: writability is probed with an empty temporary folder, removed at once.

    Raises:
        OutputError: the folder is inside (or equal to) a source, exists and is non-empty
            without ``overwrite``, is a file, lies under a file, or its parent is not writable.
    """
    try:
        resolved = out_dir.expanduser().resolve()
        for source in sources:
            src = source.expanduser().resolve()
            if _is_within(resolved, src) or _is_within(src, resolved):
                raise OutputError(f"{out_dir}: output folder overlaps the source {source}; choose a folder outside it")
        if resolved.exists() and not resolved.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a folder; choose another --out")
        if resolved.is_dir() and any(resolved.iterdir()) and not overwrite:
            raise OutputError(f"{out_dir}: folder exists and is not empty; pass --overwrite or choose another --out")
        parent = _nearest_existing(resolved.parent)
        if not parent.is_dir():
            raise OutputError(f"{out_dir}: {parent} is a file, not a folder; choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{out_dir}: cannot write in {parent} (permission denied); choose a writable --out")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".nextoffline-probe-", dir=parent))  # root passes os.access; read-only mounts do not
        except OSError as exc:
            raise OutputError(f"{out_dir}: cannot create folders in {parent} ({exc.strerror or exc}); choose a writable --out") from None
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{out_dir}: unusable output location ({exc.strerror or exc}); choose another --out") from None
    return resolved


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finalise_tree(root: Path) -> None:
    """Give files and folders the usual permissions (mkdtemp makes 0700) and fsync them."""
    mask = _current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            path.chmod(0o666 & ~mask)
            _fsync_path(path)
        Path(dirpath).chmod(0o777 & ~mask)
        _fsync_path(Path(dirpath))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the OS or filesystem cannot."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


class AtomicOutputDir:
    """Context manager yielding a temporary folder that becomes ``final`` on success.

    Example:
        >>> with AtomicOutputDir(Path("out"), required_bytes=10_000) as tmp:
        ...     write_json(tmp / "a.json", {"x": 1})
    """

    def __init__(self, final: Path, *, overwrite: bool = False, required_bytes: int = 0) -> None:
        self.final = final
        self.overwrite = overwrite
        self.required_bytes = required_bytes
        self.tmp: Path | None = None
        self._created: list[Path] = []

    def _prefix(self, kind: str) -> str:
        return f".{self.final.name}.{kind}-{_host()}-{os.getpid()}-"

    def __enter__(self) -> Path:
        parent = self.final.parent
        try:
            self._make_parents(parent)
            self._remove_stale(parent)
            free = shutil.disk_usage(parent).free
            if self.required_bytes and free < self.required_bytes * 1.1:
                raise OutputError(
                    f"{self.final}: not enough disk space ({_size(free)} free, {_size(self.required_bytes)} needed); "
                    "free space or choose another --out"
                )
            self.tmp = Path(tempfile.mkdtemp(prefix=self._prefix("tmp"), dir=parent))
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError) and not isinstance(exc, NextOfflineError):
                raise OutputError(f"{self.final}: cannot write in {parent} ({exc.strerror or exc}); choose a writable --out") from None
            raise
        return self.tmp

    def _make_parents(self, parent: Path) -> None:
        missing = []
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created.append(folder)

    def _remove_stale(self, parent: Path) -> None:
        """Delete hidden temporary folders for the same output left by killed runs on this host."""
        pattern = re.compile(rf"^\.{re.escape(self.final.name)}\.(tmp|old)-{re.escape(_host())}-(\d+)-[a-z0-9_]+$")
        for child in parent.iterdir():
            match = pattern.match(child.name)
            if match is None or _pid_alive(int(match[2])) or not child.is_dir():
                continue
            previous = child / "previous"
            if match[1] == "old" and previous.is_dir() and not self.final.exists():
                os.replace(previous, self.final)  # killed between the two renames of an overwrite: put it back
                LOG.warning("restored %s from an interrupted overwrite", self.final)
            LOG.info("removing %s, left by a killed run", child)
            shutil.rmtree(child, ignore_errors=True)

    def _discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.tmp is not None
        if exc_type is None:
            try:
                self._commit()
                return
            except BaseException as error:  # noqa: BLE001 - re-raised below after the temp folder is removed
                exc = error
        self._discard()
        if isinstance(exc, OSError) and not isinstance(exc, NextOfflineError):
            if exc.errno == errno.ENOSPC:
                raise OutputError(
                    f"{self.final}: ran out of disk space while writing; nothing was written: free space or choose another --out"
                ) from None
            raise OutputError(f"{self.final}: could not finish writing ({exc.strerror or exc}); nothing was written") from None
        if exc_type is None:
            raise exc  # type: ignore[misc]

    def _commit(self) -> None:
        assert self.tmp is not None
        _finalise_tree(self.tmp)
        _test_delay()
        parent = self.final.parent
        if self.final.is_dir() and any(self.final.iterdir()):
            if not self.overwrite:
                raise OutputError(f"{self.final}: folder appeared while writing; nothing was replaced")
            if _rename_exchange(self.tmp, self.final):  # atomic: the old output now sits in tmp
                _fsync_path(parent)
                shutil.rmtree(self.tmp, ignore_errors=True)
                LOG.info("wrote %s", self.final)
                return
            old = Path(tempfile.mkdtemp(prefix=self._prefix("old"), dir=parent))
            os.replace(self.final, old / "previous")
            os.replace(self.tmp, self.final)
            _fsync_path(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
            _fsync_path(parent)
        self._created = []
        LOG.info("wrote %s", self.final)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Infinity floats replaced by ``None`` (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors (contiguous, CPU) with string metadata."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata=dict(metadata or {}))
    LOG.debug("wrote %s (%.2f MiB)", path, path.stat().st_size / 2**20)
    _test_delay()


def write_json(path: Path, payload: Any) -> None:
    """Strict JSON (non-finite numbers become ``null``)."""
    path.write_text(json.dumps(json_safe(payload), indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    _test_delay()


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _test_delay()


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file (never a hard link: the source must stay untouchable)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    _test_delay()
