"""Atomic, crash-safe output folders.

Outputs are assembled in a hidden temporary sibling (``.NAME.tmp-XXXX``), every file is
fsynced, and the folder is renamed into place. A run killed at any moment leaves either the
complete output or no output under the final name (at most a hidden temporary folder).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from nextoffline.errors import OutputError

__all__ = ["AtomicOutputDir", "check_output_location", "write_safetensors", "write_json", "write_text", "copy_file"]

LOG = logging.getLogger(__name__)


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_location(out_dir: Path, *, sources: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Validate an output folder before any work is done; returns its resolved path.

    Raises:
        OutputError: the folder is inside (or equal to) a source, exists and is non-empty
            without ``overwrite``, is a file, or its parent is not writable.
    """
    resolved = out_dir.expanduser().resolve()
    for source in sources:
        src = source.expanduser().resolve()
        if _is_within(resolved, src) or _is_within(src, resolved):
            raise OutputError(f"{out_dir}: output folder overlaps the source {source}; choose a folder outside it")
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder; choose another --out")
    if resolved.is_dir() and any(resolved.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir}: folder exists and is not empty; pass --overwrite or choose another --out")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out_dir}: cannot write in {parent} (permission denied); choose a writable --out")
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

    def __enter__(self) -> Path:
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(parent).free
        except OSError as exc:
            raise OutputError(f"{self.final}: cannot create the output folder ({exc.strerror}); choose a writable --out") from None
        if self.required_bytes and free < self.required_bytes * 1.1:
            need, have = self.required_bytes / 2**20, free / 2**20
            raise OutputError(f"{self.final}: not enough disk space ({have:.1f} MiB free, {need:.1f} MiB needed); free space or choose another --out")
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=parent))
        except OSError as exc:
            raise OutputError(f"{self.final}: cannot write in {parent} ({exc.strerror}); choose a writable --out") from None
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._commit()
        except OSError as error:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"{self.final}: could not finish writing ({error.strerror}); nothing was written") from None

    def _commit(self) -> None:
        assert self.tmp is not None
        _finalise_tree(self.tmp)
        old: Path | None = None
        if self.final.exists():
            if not self.overwrite and any(self.final.iterdir()):
                raise OutputError(f"{self.final}: folder appeared while writing; nothing was replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.replace(self.final, old / "previous")
        os.replace(self.tmp, self.final)
        _fsync_path(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        LOG.info("wrote %s", self.final)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors (contiguous, CPU) with string metadata."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata=dict(metadata or {}))
    LOG.debug("wrote %s (%.2f MiB)", path, path.stat().st_size / 2**20)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file (never a hard link: the source must stay untouchable)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
