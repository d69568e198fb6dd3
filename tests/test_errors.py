"""Catalogue of bad inputs: each gets a one-line error naming the file and the fix, and nothing changes on disk.

Every case runs the real CLI (``click.testing.CliRunner`` on ``nextoffline.cli:main``; a few
also in a real ``python -m nextoffline`` subprocess) and asserts the clean-error contract:

* exit code 1 and exactly one ``error: ...`` line on stderr, the last one, with no traceback;
  the line contains the expected fragments (the offending file or option, and the fix);
* with ``-v`` the same error propagates as the expected :class:`NextOfflineError` subclass;
* nothing is written, moved or left behind: every file and folder of the test's workspace
  (sources, any pre-existing ``--out``) is byte-identical before and after, hidden ones included.

``CASES`` is the catalogue; ``docs/errors.md`` documents every case id (checked below).
Run ``python -m tests.test_errors`` to print the table rows of ``docs/errors.md`` from the
actual messages.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nextoffline import errors as E
from nextoffline.cli import main
from nextoffline.synthetic import SyntheticSpec, write_synthetic_trajectory

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "errors.md"

MODULES = [("model.layers.0.self_attn.q_proj", 16, 16), ("model.layers.0.mlp.down_proj", 16, 24)]
STEPS = (10, 20, 30, 40)
PREFIX = "base_model.model.model.layers.0"
A_KEY = f"{PREFIX}.self_attn.q_proj.lora_A.weight"
B_KEY = f"{PREFIX}.self_attn.q_proj.lora_B.weight"
DOWN_A = f"{PREFIX}.mlp.down_proj.lora_A.weight"
DOWN_B = f"{PREFIX}.mlp.down_proj.lora_B.weight"
#: Options appended per command when the case gives none (a predictor that needs no backtest).
DEFAULT_OPTIONS = {
    "extrapolate": ["--to-step", "60", "--method", "linear"],
    "inspect": [],
    "backtest": ["--methods", "linear", "--holdout", "1"],
}


# ------------------------------------------------------------------------------------- builders


def make_run(root: Path, steps=STEPS, **spec: Any) -> Path:
    spec.setdefault("modules", MODULES)
    write_synthetic_trajectory(root, SyntheticSpec(steps=list(steps), rank=4, law="sqrt", noise=0.01, **spec))
    return root


def weights(run: Path, step: int) -> Path:
    return run / f"step_{step}" / "adapter_model.safetensors"


def config_path(run: Path, step: int) -> Path:
    return run / f"step_{step}" / "adapter_config.json"


def edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]) -> None:
    tensors = load_file(path)
    result = fn(tensors)
    save_file(tensors if result is None else result, str(path), metadata={"format": "pt"})


def edit_all(run: Path, fn: Callable[[dict[str, torch.Tensor]], Any], steps=STEPS) -> None:
    for step in steps:
        edit_tensors(weights(run, step), fn)


def edit_config(path: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    config = json.loads(path.read_text())
    fn(config)
    path.write_text(json.dumps(config))


def edit_configs(run: Path, fn: Callable[[dict[str, Any]], Any], steps=STEPS) -> None:
    for step in steps:
        edit_config(config_path(run, step), fn)


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_raw(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def run_in(ws: Path, **spec: Any) -> Path:
    return make_run(ws / "in" / "run", **spec)


def source(run: Path) -> list[str]:
    return [str(run)]


# ---------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: stable name, documented in docs/errors.md.
        what: the bad input, in words (for the docs).
        setup: builds the inputs under the workspace and returns the source arguments.
        expect: fragments the error line must contain (the file or option, and the fix).
        error: the NextOfflineError subclass raised.
        commands: the commands tried (``extrapolate`` writes; ``inspect``/``backtest`` only read).
        options: options replacing ``DEFAULT_OPTIONS`` of ``extrapolate``.
        out: ``--out`` relative to the workspace (absolute if it starts with ``/``).
        patch: in-process simulation (e.g. a full disk); such cases are not run in a subprocess.
    """

    id: str
    what: str
    setup: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    error: type[E.NextOfflineError]
    commands: tuple[str, ...] = ("extrapolate",)
    options: tuple[str, ...] | None = None
    out: str = "out"
    patch: Callable[[], ContextManager[Any]] | None = None
    skip: str | None = None


READERS = ("extrapolate", "inspect", "backtest")


def _with_run(mutate: Callable[[Path], Any], **spec: Any) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        run = run_in(ws, **spec)
        mutate(run)
        return source(run)

    return setup


def _plain(ws: Path) -> list[str]:
    return source(run_in(ws))


def _adapters(ws: Path, pairs: list[tuple[int, str]]) -> list[str]:
    run = run_in(ws)
    args: list[str] = []
    for step, folder in pairs:
        args += ["--adapter", f"{step}={run / folder}"]
    return args


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _garble_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xff{not json at all, sorry!!!\x00\x01"[:32]
    path.write_bytes(bytes(raw))


def _set_header(path: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    header, data = read_raw(path)
    fn(header)
    write_raw(path, header, data)


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {k: v for k, v in t.items() if k != key}


def _add_key(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def _poison(key: str, value: float, index: tuple[int, int] = (1, 2)) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][index] = value

    return fn


def _config_set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.update(values)


def _config_drop(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.pop(name, None)


def _key_marker(marker: str) -> Callable[[Path], None]:
    return lambda run: edit_all(run, _add_key(f"{PREFIX}.self_attn.q_proj.{marker}", torch.ones(4, 16)))


def _peft_type(peft_type: str) -> Callable[[Path], None]:
    return lambda run: edit_configs(run, _config_set(peft_type=peft_type))


def _disk_usage_full(path: Any) -> Any:
    return shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - 1000, 1000)  # type: ignore[attr-defined]


def _full_disk() -> ContextManager[Any]:
    return mock.patch("nextoffline.io.writer.shutil.disk_usage", _disk_usage_full)


def _enospc(*args: Any, **kwargs: Any) -> None:
    path = Path(args[1])
    path.write_bytes(b"\0" * 100)  # a partial file, as a real full disk leaves
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_disk_while_writing() -> ContextManager[Any]:
    return mock.patch("nextoffline.io.writer.save_file", _enospc)


def _out_file(ws: Path) -> list[str]:
    (ws / "afile").write_text("not a folder\n")
    return _plain(ws)


def _out_nonempty(ws: Path) -> list[str]:
    (ws / "out").mkdir()
    (ws / "out" / "keep.txt").write_text("previous results\n")
    return _plain(ws)


def _readonly_parent(ws: Path) -> list[str]:
    (ws / "locked").mkdir()
    (ws / "locked").chmod(0o555)
    return _plain(ws)


def _tensor_parallel_trl_run(ws: Path) -> list[str]:
    """A transformers.Trainer run whose newest checkpoint has a DeepSpeed tag with a second tensor-parallel rank."""
    run = make_run(ws / "in" / "run")
    for step in STEPS:
        folder = run / f"step_{step}"
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        folder.rename(run / f"checkpoint-{step}")
    tag = run / f"checkpoint-{STEPS[-1]}" / f"global_step{STEPS[-1]}"
    tag.mkdir()
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        torch.save({"module": {}}, tag / name)
    return source(run)


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores permission bits

CASES: list[Case] = [
    # --- where the checkpoints are
    Case(
        "missing-source",
        "SOURCE folder does not exist",
        lambda ws: [str(ws / "in" / "no-such-run")],
        ("no-such-run", "does not exist", "pass a run folder"),
        E.SourceNotFoundError,
        READERS,
    ),
    Case(
        "source-is-a-file",
        "SOURCE is a file",
        lambda ws: _file_source(ws),
        ("run.txt", "not a folder", "pass the run folder"),
        E.SourceNotFoundError,
        READERS,
    ),
    Case(
        "no-source-argument",
        "neither SOURCE nor --adapter",
        lambda ws: [],
        ("missing SOURCE", "--adapter STEP=PATH"),
        E.UsageError,
        READERS,
    ),
    Case(
        "source-and-adapter",
        "both SOURCE and --adapter",
        lambda ws: [*_plain(ws), "--adapter", f"10={ws / 'in' / 'run' / 'step_10'}"],
        ("either SOURCE or --adapter",),
        E.UsageError,
    ),
    Case(
        "no-checkpoints",
        "a folder without any step-named adapter folder",
        lambda ws: _unrelated_folder(ws),
        ("no checkpoints found", "point at the run folder or pass --adapter"),
        E.FormatDetectionError,
        READERS,
    ),
    Case(
        "unknown-format",
        "--format names no known layout",
        lambda ws: [*_plain(ws), "--format", "megatron"],
        ("unknown format 'megatron'", "use one of"),
        E.FormatDetectionError,
    ),
    Case(
        "too-few-steps",
        "fewer than 3 checkpoints",
        lambda ws: source(make_run(ws / "in" / "run", steps=(10, 20))),
        ("run: found 2 checkpoint(s)", "at least 3 are needed"),
        E.NotEnoughCheckpointsError,
        READERS,
    ),
    Case(
        "duplicate-step-folders",
        "step_10/ and step-10/ in one run",
        _with_run(lambda run: shutil.copytree(run / "step_10", run / "step-10")),
        ("step 10 appears twice (step-10, step_10)", "keep one folder per step"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "duplicate-adapter-option",
        "--adapter given twice for one step",
        lambda ws: _adapters(ws, [(10, "step_10"), (20, "step_20"), (20, "step_30"), (40, "step_40")]),
        ("step 20 given twice", "step_20", "step_30", "keep one --adapter per step"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "adapter-option-syntax",
        "--adapter without STEP=",
        lambda ws: ["--adapter", str(ws / "step_10")],
        ("expected STEP=PATH", "--adapter 100=runs/step_100"),
        E.UsageError,
    ),
    Case(
        "adapter-folder-missing",
        "--adapter points at a missing folder",
        lambda ws: _adapters(ws, [(10, "step_10"), (20, "step_20"), (30, "gone")]),
        ("gone: adapter folder for step 30 does not exist", "fix --adapter 30=PATH"),
        E.SourceNotFoundError,
    ),
    Case(
        "too-few-adapters",
        "only 2 --adapter folders",
        lambda ws: _adapters(ws, [(10, "step_10"), (20, "step_20")]),
        ("--adapter: found 2 checkpoint(s)", "at least 3"),
        E.NotEnoughCheckpointsError,
    ),
    # --- weight files
    Case(
        "weights-missing",
        "a step folder without adapter_model.safetensors",
        _with_run(lambda run: weights(run, 20).unlink()),
        ("step_20/adapter_model.safetensors: weight file is missing", "check the checkpoint folder"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "weights-empty",
        "a 0-byte weight file",
        _with_run(lambda run: _truncate(weights(run, 20), 0)),
        ("step_20/adapter_model.safetensors: file is truncated (0 bytes", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "weights-truncated-data",
        "a weight file cut in its tensor data",
        _with_run(lambda run: _truncate(weights(run, 30), weights(run, 30).stat().st_size - 100)),
        ("step_30/adapter_model.safetensors: file is truncated", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "weights-truncated-header",
        "a weight file cut inside its JSON header",
        _with_run(lambda run: _truncate(weights(run, 30), 8 + _header_length(weights(run, 30)) // 2)),
        ("step_30/adapter_model.safetensors: file is truncated", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "header-not-json",
        "garbage bytes in the safetensors header",
        _with_run(lambda run: _garble_header(weights(run, 20))),
        ("step_20/adapter_model.safetensors: corrupted safetensors header (not JSON)", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "header-length-corrupt",
        "an absurd header length prefix",
        _with_run(lambda run: weights(run, 20).write_bytes(struct.pack("<Q", 2**62) + weights(run, 20).read_bytes()[8:])),
        ("step_20/adapter_model.safetensors: corrupted safetensors header (header length", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "header-shape-mismatch",
        "a header shape that does not match the data size",
        _with_run(lambda run: _set_header(weights(run, 20), lambda h: h[A_KEY].__setitem__("shape", [4, 17]))),
        ("step_20/adapter_model.safetensors: corrupted safetensors header (size of", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "header-bad-offsets",
        "non-integer data offsets",
        _with_run(lambda run: _set_header(weights(run, 20), lambda h: h[A_KEY].__setitem__("data_offsets", ["0", "x"]))),
        ("step_20/adapter_model.safetensors: corrupted safetensors header (data offsets", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "header-overlap",
        "two tensors claiming the same bytes",
        _with_run(
            lambda run: _set_header(weights(run, 20), lambda h: h[B_KEY].__setitem__("data_offsets", list(h[A_KEY]["data_offsets"])))
        ),
        ("step_20/adapter_model.safetensors: corrupted safetensors header", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "trailing-bytes",
        "junk appended after the last tensor",
        _with_run(lambda run: weights(run, 20).write_bytes(weights(run, 20).read_bytes() + b"junk")),
        ("step_20/adapter_model.safetensors: file has 4 unexpected bytes", "re-save or re-download"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "unsupported-dtype",
        "a float8 tensor",
        _with_run(
            lambda run: (
                edit_all(run, _poison(A_KEY, 0.0)) or edit_all(run, lambda t: t.__setitem__(A_KEY, t[A_KEY].to(torch.float8_e4m3fn)))
            )
        ),
        ("adapter_model.safetensors: tensor", "unsupported dtype 'F8_E4M3'", "float32, float16 or bfloat16"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "integer-factor",
        "an int32 tensor where a LoRA factor is expected",
        _with_run(lambda run: edit_all(run, lambda t: t.__setitem__(A_KEY, (t[A_KEY] * 100).to(torch.int32)))),
        (
            "step_40/adapter_model.safetensors",
            "lora_A.weight is int32, but LoRA factors are floating point",
            "re-save the adapter in float32",
        ),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "dtype-differs",
        "one step saved in float16, the others in float32",
        _with_run(lambda run: edit_tensors(weights(run, 20), lambda t: {k: v.half() for k, v in t.items()})),
        ("step_20/adapter_model.safetensors", "is float16 but float32 at step 40", "save all checkpoints in one dtype"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "nan-in-factor",
        "NaN in lora_A of a middle step",
        _with_run(lambda run: edit_tensors(weights(run, 20), _poison(A_KEY, float("nan")))),
        ("step_20/adapter_model.safetensors: tensor", "lora_A.weight holds NaN or Inf", "use an earlier checkpoint or drop this step"),
        E.NumericalError,
        READERS,
    ),
    Case(
        "inf-in-factor",
        "+Inf in lora_B of the latest step",
        _with_run(lambda run: edit_tensors(weights(run, 40), _poison(B_KEY, float("inf")))),
        ("step_40/adapter_model.safetensors: tensor", "lora_B.weight holds NaN or Inf", "drop this step"),
        E.NumericalError,
        READERS,
    ),
    Case(
        "nan-in-passthrough",
        "NaN in a non-LoRA tensor (modules_to_save) that is copied to the output",
        _with_run(lambda run: edit_all(run, _add_key(f"{PREFIX}.norm.weight", torch.tensor([1.0, float("nan")])))),
        ("step_40/adapter_model.safetensors: tensor", "norm.weight holds NaN or Inf", "drop this step"),
        E.NumericalError,
    ),
    Case(
        "huge-factor",
        "a factor 1e30 (corrupted bits) among ordinary ones",
        _with_run(lambda run: edit_tensors(weights(run, 20), _poison(DOWN_A, 1e30))),
        ("step_20/adapter_model.safetensors: tensor", "far beyond the range of the other LoRA factors", "re-save it or drop this step"),
        E.NumericalError,
        READERS,
    ),
    Case(
        "keys-differ",
        "a module missing from one step",
        _with_run(lambda run: edit_tensors(weights(run, 20), lambda t: {k: v for k, v in t.items() if "down_proj" not in k})),
        ("step_20/adapter_model.safetensors: tensor keys differ from step 40", "all checkpoints must adapt the same modules"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "shapes-differ",
        "a module with other in_features in one step",
        _with_run(lambda run: edit_tensors(weights(run, 20), lambda t: t.__setitem__(DOWN_A, torch.zeros(4, 20)))),
        ("step_20/adapter_model.safetensors", "has shape [4, 20] but [4, 24] at step 40", "ranks or models differ"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "rank-differs",
        "one step trained with r=8",
        lambda ws: _rank8_step(ws),
        ("step_20/adapter_config.json: r=8 differs from step 10 (4)", "all checkpoints must come from one run"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "alpha-differs",
        "lora_alpha differs in one step",
        _with_run(lambda run: edit_config(config_path(run, 30), _config_set(lora_alpha=16))),
        ("step_30/adapter_config.json: lora_alpha=16 differs from step 10 (8.0)", "one run"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "target-modules-differ",
        "target_modules differ in one step",
        _with_run(lambda run: edit_config(config_path(run, 30), _config_set(target_modules=["q_proj"]))),
        ("step_30/adapter_config.json: target_modules=['q_proj'] differs", "one run"),
        E.IncompatibleCheckpointsError,
        READERS,
    ),
    Case(
        "rank-differs-from-config",
        "tensors of rank 4 but r=8 in every config",
        _with_run(lambda run: edit_configs(run, _config_set(r=8))),
        ("step_40/adapter_model.safetensors", "has rank 4 but adapter_config.json says r=8", "fix r/rank_pattern"),
        E.AdapterConfigError,
        READERS,
    ),
    Case(
        "lora-a-without-b",
        "a module with lora_A but no lora_B",
        _with_run(lambda run: edit_all(run, _drop(DOWN_B))),
        ("step_40/adapter_model.safetensors: module", "down_proj has lora_A but not its partner", "incomplete"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "no-lora-tensors",
        "a weight file without LoRA tensors",
        _with_run(lambda run: edit_all(run, lambda t: {"base_model.model.lm_head.weight": torch.ones(2, 2)})),
        ("step_40/adapter_model.safetensors: no LoRA tensors", "is this a LoRA adapter?"),
        E.AdapterFileError,
        READERS,
    ),
    Case(
        "conv-lora",
        "4-D (Conv2d) LoRA factors",
        _with_run(lambda run: edit_all(run, lambda t: t.__setitem__(A_KEY, t[A_KEY].reshape(4, 16, 1, 1)))),
        ("lora_A.weight has shape [4, 16, 1, 1]", "only 2-D (Linear/Embedding) LoRA is supported"),
        E.UnsupportedAdapterError,
        READERS,
    ),
    Case(
        "empty-factor",
        "a factor with a zero-size dimension",
        _with_run(lambda run: edit_all(run, lambda t: t.__setitem__(DOWN_B, torch.zeros(0, 4)))),
        ("lora_B.weight is empty (shape [0, 4])", "re-save this checkpoint"),
        E.AdapterFileError,
        READERS,
    ),
    # --- adapter_config.json
    Case(
        "config-missing",
        "a step folder with weights but no adapter_config.json",
        _with_run(lambda run: config_path(run, 20).unlink()),
        ("step_20/adapter_config.json: missing next to adapter_model.safetensors", "restore the adapter_config.json"),
        E.AdapterConfigError,
        READERS,
    ),
    Case(
        "config-missing-explicit",
        "--adapter folder without adapter_config.json",
        lambda ws: _adapter_without_config(ws),
        ("step_20/adapter_config.json: missing", "needs the adapter_config.json that PEFT writes"),
        E.AdapterConfigError,
    ),
    Case(
        "config-invalid-json",
        "adapter_config.json is not JSON",
        _with_run(lambda run: config_path(run, 20).write_text('{"r": 4,')),
        ("step_20/adapter_config.json: invalid JSON", "restore the file PEFT wrote"),
        E.AdapterConfigError,
        READERS,
    ),
    Case(
        "config-not-object",
        "adapter_config.json holds a list",
        _with_run(lambda run: config_path(run, 20).write_text("[4, 8]")),
        ("step_20/adapter_config.json: expected a JSON object", "restore the file PEFT wrote"),
        E.AdapterConfigError,
    ),
    Case(
        "config-r-missing",
        "no r in adapter_config.json",
        _with_run(lambda run: edit_config(config_path(run, 10), _config_drop("r"))),
        ("step_10/adapter_config.json: r must be a positive number, found None", "restore the file PEFT wrote"),
        E.AdapterConfigError,
    ),
    Case(
        "config-r-negative",
        "r = -4",
        _with_run(lambda run: edit_config(config_path(run, 10), _config_set(r=-4))),
        ("step_10/adapter_config.json: r must be a positive number, found -4", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-r-string",
        'r = "4"',
        _with_run(lambda run: edit_config(config_path(run, 10), _config_set(r="4"))),
        ("step_10/adapter_config.json: r must be a positive number, found '4'", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-r-fraction",
        "r = 4.5",
        _with_run(lambda run: edit_config(config_path(run, 10), _config_set(r=4.5))),
        ("step_10/adapter_config.json: r must be a whole number", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-alpha-infinite",
        "lora_alpha = Infinity",
        _with_run(
            lambda run: config_path(run, 10).write_text(
                config_path(run, 10).read_text().replace('"lora_alpha": 8.0', '"lora_alpha": Infinity')
            )
        ),
        ("step_10/adapter_config.json: lora_alpha must be a positive number, found inf", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-alpha-absurd",
        "lora_alpha = 1e30 (scaling beyond float32 arithmetic)",
        _with_run(lambda run: edit_configs(run, _config_set(lora_alpha=1e30))),
        ("step_10/adapter_config.json: lora_alpha 1e+30 with r 4 gives the LoRA scaling", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-bool-as-string",
        'use_rslora = "yes"',
        _with_run(lambda run: edit_config(config_path(run, 10), _config_set(use_rslora="yes"))),
        ("step_10/adapter_config.json: use_rslora must be true or false, found 'yes'", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-rank-pattern-not-object",
        "rank_pattern is a list",
        _with_run(lambda run: edit_configs(run, _config_set(rank_pattern=[8]))),
        ("step_10/adapter_config.json: rank_pattern must be an object", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-rank-pattern-bad-regex",
        "a rank_pattern key that is not a regular expression",
        _with_run(lambda run: edit_configs(run, _config_set(rank_pattern={"q_proj(": 8}))),
        ("step_10/adapter_config.json: rank_pattern key 'q_proj(' is not a valid regular expression", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-target-modules-type",
        "target_modules = 3",
        _with_run(lambda run: edit_configs(run, _config_set(target_modules=3))),
        ("step_10/adapter_config.json: target_modules must be a list of module names or a string", "restore"),
        E.AdapterConfigError,
    ),
    Case(
        "config-peft-type-type",
        "peft_type = 1",
        _with_run(lambda run: edit_configs(run, _config_set(peft_type=1))),
        ("step_10/adapter_config.json: peft_type must be a string", "restore"),
        E.AdapterConfigError,
    ),
    # --- adapter types and options other than plain LoRA
    Case(
        "dora-config",
        "use_dora: true",
        _with_run(lambda run: edit_configs(run, _config_set(use_dora=True))),
        ("step_10/adapter_config.json: DoRA (use_dora=True) is not supported", "train with plain LoRA"),
        E.UnsupportedAdapterError,
        READERS,
    ),
    Case(
        "dora-keys",
        "lora_magnitude_vector tensors (DoRA) under a LORA config",
        _with_run(_key_marker("lora_magnitude_vector")),
        ("step_40/adapter_model.safetensors: tensor", "lora_magnitude_vector is not plain LoRA (DoRA)", "plain LoRA adapters only"),
        E.UnsupportedAdapterError,
        READERS,
    ),
    *[
        Case(
            f"{name.lower().replace('_', '-')}-config",
            f"peft_type {name}",
            _with_run(_peft_type(name)),
            (f"step_10/adapter_config.json: peft_type {name} is not supported", "plain LoRA adapters only"),
            E.UnsupportedAdapterError,
            READERS,
        )
        for name in ("LOHA", "LOKR", "VERA", "IA3", "PROMPT_TUNING", "ADALORA")
    ],
    *[
        Case(
            f"{kind}-keys",
            f"{marker} tensors ({label}) under a LORA config",
            _with_run(_key_marker(marker)),
            (f"{marker} is not plain LoRA ({label})", "plain LoRA adapters only"),
            E.UnsupportedAdapterError,
            READERS,
        )
        for kind, marker, label in (
            ("loha", "hada_w1_a", "LoHa"),
            ("lokr", "lokr_w1", "LoKr"),
            ("vera", "vera_lambda_b", "VeRA"),
            ("ia3", "ia3_l", "IA3"),
            ("prompt-tuning", "prompt_embeddings", "prompt tuning"),
            ("adalora", "lora_E", "AdaLoRA"),
        )
    ],
    *[
        Case(
            f"option-{option.replace('_', '-')}",
            f"{option}: {value!r}",
            _with_run(lambda run, o=option, v=value: edit_configs(run, _config_set(**{o: v}))),
            (f"step_10/adapter_config.json: {label} ({option}={value!r}) is not supported", "train with plain LoRA"),
            E.UnsupportedAdapterError,
        )
        for option, value, label in (
            ("use_qalora", True, "QA-LoRA"),
            ("lora_bias", True, "LoRA bias"),
            ("target_parameters", ["experts.gate_up_proj"], "LoRA on parameters"),
            ("layer_replication", [[0, 1]], "layer replication"),
        )
    ],
    # --- targets and options
    Case(
        "to-step-at-last",
        "--to-step equal to the last step",
        _plain,
        ("--to-step 40", "the target must be after the last checkpoint (step 40)"),
        E.UsageError,
        options=("--to-step", "40", "--method", "linear"),
    ),
    Case(
        "to-step-before-last",
        "--to-step before the last step",
        _plain,
        ("--to-step 25", "must be after the last checkpoint"),
        E.UsageError,
        options=("--to-step", "25", "--method", "linear"),
    ),
    Case(
        "to-step-not-a-number",
        "--to-step soon",
        _plain,
        ("--to-step 'soon'", "is not a number", "separated by commas"),
        E.UsageError,
        options=("--to-step", "soon"),
    ),
    Case(
        "coef-negative",
        "--coef -1",
        _plain,
        ("--coef -1", "coefficients must be finite and >= 0"),
        E.UsageError,
        options=("--coef", "-1", "--method", "linear"),
    ),
    Case(
        "coef-not-a-number", "--coef 1,abc", _plain, ("--coef '1,abc'", "'abc' is not a number"), E.UsageError, options=("--coef", "1,abc")
    ),
    Case("coef-infinite", "--coef inf", _plain, ("--coef 'inf'", "values must be finite"), E.UsageError, options=("--coef", "inf")),
    Case(
        "no-target", "neither --to-step nor --coef", _plain, ("give --to-step N or --coef C",), E.UsageError, options=("--method", "linear")
    ),
    Case(
        "unknown-method",
        "--method magic",
        _plain,
        ("unknown method 'magic'", "use auto or one of"),
        E.UsageError,
        options=("--coef", "1", "--method", "magic"),
    ),
    Case(
        "holdout-too-large",
        "auto backtest that leaves fewer than 3 checkpoints",
        _plain,
        ("backtest with --holdout 2 leaves 2 of 4 checkpoints", "lower --holdout", "--method"),
        E.NotEnoughCheckpointsError,
        options=("--coef", "1"),
    ),
    Case(
        "resumable-several-targets",
        "--resumable with two coefficients and no --eval-cmd",
        _plain,
        ("--resumable needs one target",),
        E.UsageError,
        options=("--coef", "1,2", "--method", "linear", "--resumable"),
    ),
    Case(
        "resumable-unhandled-weight-file",
        "--resumable on a TRL checkpoint holding DeepSpeed tensor-parallel states it does not rewrite",
        _tensor_parallel_trl_run,
        ("mp_rank_01_model_states.pt", "tensor-parallel rank > 0", "TRL + DeepSpeed", "old LoRA", "PeftModel.from_pretrained"),
        E.UnhandledCheckpointError,
        options=("--coef", "1", "--method", "linear", "--resumable"),
    ),
    # --- the output folder
    Case(
        "out-not-empty",
        "--out exists and is not empty, no --overwrite",
        _out_nonempty,
        ("out: folder exists and is not empty", "pass --overwrite or choose another --out"),
        E.OutputError,
    ),
    Case(
        "out-is-a-file",
        "--out is an existing file",
        _out_file,
        ("afile: exists and is not a folder", "choose another --out"),
        E.OutputError,
        out="afile",
    ),
    Case(
        "out-inside-source",
        "--out inside the run folder",
        _plain,
        ("output folder overlaps the source", "choose a folder outside it"),
        E.OutputError,
        out="in/run/next",
    ),
    Case(
        "out-is-source-overwrite",
        "--out is the run folder itself, with --overwrite",
        _plain,
        ("output folder overlaps the source",),
        E.OutputError,
        options=("--to-step", "60", "--method", "linear", "--overwrite"),
        out="in/run",
    ),
    Case(
        "out-contains-source",
        "--out is a parent of the run folder, with --overwrite",
        _plain,
        ("output folder overlaps the source",),
        E.OutputError,
        options=("--to-step", "60", "--method", "linear", "--overwrite"),
        out="in",
    ),
    Case(
        "out-inside-adapter",
        "--out inside an --adapter folder",
        lambda ws: _adapters(ws, [(10, "step_10"), (20, "step_20"), (30, "step_30")]),
        ("output folder overlaps the source", "choose a folder outside it"),
        E.OutputError,
        out="in/run/step_20/next",
    ),
    Case(
        "out-under-a-file",
        "--out below a regular file",
        _out_file,
        ("afile is a file, not a folder", "choose another --out"),
        E.OutputError,
        out="afile/out",
    ),
    Case(
        "out-unwritable-proc",
        "--out in /proc (not writable, even as root)",
        _plain,
        ("/proc/nextoffline-test-out: cannot create folders in /proc", "choose a writable --out"),
        E.OutputError,
        out="/proc/nextoffline-test-out",
        skip=None if sys.platform.startswith("linux") else "needs Linux /proc",
    ),
    Case(
        "out-unwritable-chmod",
        "--out in a read-only folder (chmod 555)",
        _readonly_parent,
        ("permission denied", "choose a writable --out"),
        E.OutputError,
        out="locked/out",
        skip="root ignores permission bits" if IS_ROOT else None,
    ),
    Case(
        "disk-full",
        "not enough free space for the output (simulated)",
        _plain,
        ("a/b/out: not enough disk space (1000 B free,", "free space or choose another --out"),
        E.OutputError,
        out="a/b/out",
        patch=_full_disk,
    ),
    Case(
        "disk-full-while-writing",
        "the disk fills up while the adapter is written (simulated ENOSPC)",
        _plain,
        ("ran out of disk space while writing; nothing was written", "free space or choose another --out"),
        E.OutputError,
        out="a/b/out",
        patch=_full_disk_while_writing,
    ),
]


def _file_source(ws: Path) -> list[str]:
    (ws / "in").mkdir()
    (ws / "in" / "run.txt").write_text("not a run\n")
    return [str(ws / "in" / "run.txt")]


def _unrelated_folder(ws: Path) -> list[str]:
    (ws / "in" / "logs").mkdir(parents=True)
    (ws / "in" / "notes.txt").write_text("no checkpoints here\n")
    return [str(ws / "in")]


def _rank8_step(ws: Path) -> list[str]:
    run = run_in(ws)
    other = make_run(ws / "tmp-r8", steps=(20,))
    edit_tensors(weights(other, 20), lambda t: {k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in t.items()})
    edit_config(config_path(other, 20), _config_set(r=8))
    shutil.rmtree(run / "step_20")
    shutil.move(str(other / "step_20"), str(run / "step_20"))
    shutil.rmtree(ws / "tmp-r8")
    return source(run)


def _adapter_without_config(ws: Path) -> list[str]:
    args = _adapters(ws, [(10, "step_10"), (20, "step_20"), (30, "step_30")])
    config_path(ws / "in" / "run", 20).unlink()
    return args


CASE_IDS = [case.id for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"


# --------------------------------------------------------------------------------------- harness


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root`` (hidden ones too) with a hash of each file's bytes."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        result[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ("dir" if path.is_dir() else "other")
    return result


def arguments(case: Case, command: str, ws: Path, source_args: list[str], *, verbose: bool = False) -> list[str]:
    args = [command, *source_args]
    if command == "extrapolate":
        args += list(case.options) if case.options is not None else DEFAULT_OPTIONS[command]
        args += ["--out", case.out if case.out.startswith("/") else str(ws / case.out)]
    else:
        args += DEFAULT_OPTIONS[command]
    return args + (["-v"] if verbose else [])


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nextoffline-errors-") as tmp:
        yield Path(tmp)


def invoke(args: list[str], patch: Callable[[], ContextManager[Any]] | None = None) -> Any:
    with patch() if patch else contextlib.nullcontext():
        return CliRunner().invoke(main, args)


def check_error_line(stderr: str, case: Case) -> str:
    """The contract on stderr; returns the error line."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final 'error:' line, got:\n{stderr}"
    for fragment in case.expect:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def run_case(case: Case, command: str, ws: Path) -> str:
    """Run one case through CliRunner (plain and with -v); assert the contract; return the message."""
    source_args = case.setup(ws)
    before = snapshot(ws)
    result = invoke(arguments(case, command, ws, source_args), case.patch)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    line = check_error_line(result.stderr, case)
    assert snapshot(ws) == before, "the workspace changed: inputs modified or output written"
    if case.out.startswith("/"):
        assert not Path(case.out).exists()
    verbose = invoke(arguments(case, command, ws, source_args, verbose=True), case.patch)
    assert verbose.exit_code == 1 and isinstance(verbose.exception, case.error), repr(verbose.exception)
    assert snapshot(ws) == before
    return line


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "case,command",
    [
        pytest.param(case, command, id=f"{case.id}-{command}", marks=[pytest.mark.skip(case.skip)] if case.skip else [])
        for case in CASES
        for command in case.commands
    ],
)
def test_bad_input_gets_clean_error(case: Case, command: str) -> None:
    with workspace() as ws:
        run_case(case, command, ws)


#: (case id, with -v, launcher): real processes, started together (each pays the torch import).
SUBPROCESS_RUNS = [
    ("missing-source", False, "script"),
    ("weights-truncated-data", False, "module"),
    ("out-inside-source", False, "module"),
    ("config-invalid-json", False, "module"),
    ("config-invalid-json", True, "module"),
]


def _launcher(kind: str) -> list[str]:
    if kind == "script":
        script = Path(sys.executable).with_name("nextoffline")
        return [str(script)] if script.exists() else [sys.executable, "-m", "nextoffline"]
    return [sys.executable, "-m", "nextoffline"]


@pytest.fixture(scope="module")
def subprocess_results() -> Iterator[dict[tuple[str, bool, str], tuple[Case, Path, dict[str, str], subprocess.CompletedProcess]]]:
    """Run a few cases through real ``nextoffline`` / ``python -m nextoffline`` processes, in parallel."""
    by_id = {case.id: case for case in CASES}
    with tempfile.TemporaryDirectory(prefix="nextoffline-errors-sub-") as tmp:
        jobs = []
        for n, (name, verbose, kind) in enumerate(SUBPROCESS_RUNS):
            case = by_id[name]
            ws = Path(tmp) / f"{n}-{name}"
            ws.mkdir()
            source_args = case.setup(ws)
            before = snapshot(ws)
            cmd = [*_launcher(kind), *arguments(case, "extrapolate", ws, source_args, verbose=verbose)]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ws, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            jobs.append(((name, verbose, kind), case, ws, before, proc))
        results = {}
        for key, case, ws, before, proc in jobs:
            stdout, stderr = proc.communicate(timeout=300)
            results[key] = (case, ws, before, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        yield results


@pytest.mark.parametrize("run", SUBPROCESS_RUNS, ids=[f"{n}{'-v' if v else ''}-{k}" for n, v, k in SUBPROCESS_RUNS])
def test_bad_input_in_subprocess(subprocess_results, run: tuple[str, bool, str]) -> None:
    case, ws, before, proc = subprocess_results[run]
    assert proc.returncode == 1, proc.stderr
    assert snapshot(ws) == before
    if run[1]:  # -v: the traceback of the expected error class
        assert "Traceback" in proc.stderr and f"{case.error.__name__}:" in proc.stderr, proc.stderr[-2000:]
    else:
        check_error_line(proc.stderr, case)
        assert proc.stdout == ""


def test_every_case_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    missing = [case.id for case in CASES if case.id not in rows]
    assert not missing, f"add these cases to {DOC}: {missing}"
    stale = sorted(set(rows) - set(CASE_IDS))
    assert not stale, f"{DOC} documents cases that no longer exist: {stale}"
    wrong = [case.id for case in CASES if f"`{case.error.__name__}`" not in rows[case.id]]
    assert not wrong, f"error class differs from {DOC} for: {wrong}"


def test_error_messages_are_one_line_even_with_newlines_in_paths(tmp_path: Path) -> None:
    weird = tmp_path / "run\nwith newline"
    result = CliRunner().invoke(main, ["inspect", str(weird)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "\\n" in result.stderr


def test_sigterm_unwinds_like_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM during a run becomes KeyboardInterrupt (temporary output removed, exit 130, one line)."""
    import signal

    run = make_run(tmp_path / "run")
    before = snapshot(tmp_path)

    def terminate_during_write(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with mock.patch("nextoffline.io.writer.save_file", terminate_during_write):
        result = CliRunner().invoke(
            main, ["extrapolate", str(run), "--to-step", "60", "--method", "linear", "--out", str(tmp_path / "out")]
        )
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert snapshot(tmp_path) == before


def test_valid_run_still_succeeds_and_leaves_only_out(tmp_path: Path) -> None:
    """Sanity check of the harness: the unmodified trajectory works and only --out appears."""
    run = make_run(tmp_path / "in" / "run")
    before = snapshot(tmp_path / "in")
    result = CliRunner().invoke(
        main, ["extrapolate", str(run), "--to-step", "60", "--method", "linear", "--out", str(tmp_path / "a" / "out"), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path / "in") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "in"] and [p.name for p in (tmp_path / "a").iterdir()] == ["out"]


# ------------------------------------------------------------------------------ docs generation


def _doc_rows() -> list[str]:
    rows = []
    for case in CASES:
        if case.skip:
            message = "(skipped here: " + case.skip + ")"
        else:
            with workspace() as ws:
                message = run_case(case, case.commands[0], ws)
                message = message.replace(str(ws), "…").replace("|", "\\|")
        what = case.what + (" *(readers)*" if set(READERS) <= set(case.commands) else "")
        rows.append(f"| `{case.id}` | {what} | `{case.error.__name__}` | `{message}` |")
    return rows


if __name__ == "__main__":
    print("\n".join(_doc_rows()))
