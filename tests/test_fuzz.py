"""Fuzzing of inputs through the CLI, and numerics at the edges (dtypes, scales, zero and frozen updates).

Fuzzing (hypothesis, bounded): adapter files and configs of a small valid trajectory are
mutated at random — truncation, byte flips in the length prefix, header and data, edited
header entries (shapes, dtypes, offsets), dropped tensors, dropped or retyped config fields,
broken JSON — and the CLI must keep the clean-error contract: either success (a flipped data
byte can give valid, different numbers; then the output is complete and finite), or exit 1
with one ``error: ...`` line and no traceback. Never another exception, never an output
folder or temporary file after a failure, never a modified source.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from nextoffline.cli import main
from nextoffline.synthetic import SyntheticSpec, tiny_modules, write_synthetic_trajectory

FUZZ_MODULES = [("model.layers.0.self_attn.q_proj", 8, 8), ("model.layers.0.mlp.up_proj", 12, 8)]
FUZZ_STEPS = (10, 20, 30)
CONFIG_FIELDS = [
    "r",
    "lora_alpha",
    "peft_type",
    "target_modules",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "lora_bias",
    "bias",
    "modules_to_save",
    "task_type",
    "layers_to_transform",
]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", 3, None]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-template") / "run"
    write_synthetic_trajectory(root, SyntheticSpec(steps=list(FUZZ_STEPS), modules=FUZZ_MODULES, rank=2, law="sqrt", noise=0.05))
    return root


# ------------------------------------------------------------------------------------- mutations

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 64), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=2)),
    max_leaves=4,
)
steps = st.sampled_from(FUZZ_STEPS)
fractions = st.floats(0.0, 1.0, allow_nan=False)

mutations = st.one_of(
    st.tuples(st.just("truncate"), steps, fractions),
    st.tuples(st.just("flip_prefix"), steps, st.integers(0, 7), st.integers(1, 255)),
    st.tuples(st.just("flip_header"), steps, fractions, st.integers(1, 255)),
    st.tuples(st.just("flip_data"), steps, fractions, st.integers(1, 255)),
    st.tuples(st.just("flip_exponent"), steps, fractions, st.integers(1, 255)),  # the high byte of an fp32: NaN, Inf, 1e30, 1e-30
    st.tuples(st.just("header_shape"), steps, st.integers(0, 3), st.lists(st.integers(0, 40), max_size=4)),
    st.tuples(st.just("header_dtype"), steps, st.integers(0, 3), st.sampled_from(DTYPES)),
    st.tuples(
        st.just("header_offsets"), steps, st.integers(0, 3), st.lists(st.one_of(st.integers(-4, 2000), st.text(max_size=2)), max_size=3)
    ),
    st.tuples(st.just("drop_tensor"), steps, st.integers(0, 3)),
    st.tuples(st.just("config_drop"), st.one_of(steps, st.just(0)), st.sampled_from(CONFIG_FIELDS)),
    st.tuples(st.just("config_set"), st.one_of(steps, st.just(0)), st.sampled_from(CONFIG_FIELDS), json_values),
    st.tuples(
        st.just("config_text"), steps, st.sampled_from(['{"r": 2,', "", "null", "[]", '{"r": 2}', "\udcff", '{"peft_type": "LORA"} x'])
    ),
)


def _weights(run: Path, step: int) -> Path:
    return run / f"step_{step}" / "adapter_model.safetensors"


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _tensor_key(header: dict[str, Any], index: int) -> str:
    keys = sorted(k for k in header if k != "__metadata__")
    return keys[index % len(keys)]


def apply_mutation(run: Path, mutation: tuple) -> None:
    kind, step = mutation[0], mutation[1]
    if kind.startswith("config"):
        targets = FUZZ_STEPS if step == 0 else (step,)  # 0: every step alike (so fields do not merely differ)
        for s in targets:
            path = run / f"step_{s}" / "adapter_config.json"
            if kind == "config_text":
                path.write_text(mutation[2], errors="surrogateescape")
                continue
            config = json.loads(path.read_text())
            if kind == "config_drop":
                config.pop(mutation[2], None)
            else:
                config[mutation[2]] = mutation[3]
            path.write_text(json.dumps(config))  # allow_nan: Python's JSON reads NaN/Infinity back
        return
    path = _weights(run, step)
    raw = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(bytes(raw[: int(len(raw) * mutation[2])]))
    elif kind == "flip_prefix":
        raw[mutation[2]] ^= mutation[3]
        path.write_bytes(bytes(raw))
    elif kind in ("flip_header", "flip_data", "flip_exponent"):
        (length,) = struct.unpack("<Q", bytes(raw[:8]))
        lo, hi = (8, 8 + length) if kind == "flip_header" else (8 + length, len(raw))
        index = lo + min(int((hi - lo) * mutation[2]), hi - lo - 1)
        if kind == "flip_exponent":
            index = max(lo, index - (index - lo) % 4) + 3  # little-endian fp32: sign and exponent
        raw[index] ^= mutation[3]
        path.write_bytes(bytes(raw))
    elif kind == "drop_tensor":
        tensors = load_file(path)
        tensors.pop(sorted(tensors)[mutation[2] % len(tensors)])
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        header, data = _split(bytes(raw))
        key = _tensor_key(header, mutation[2])
        field = {"header_shape": "shape", "header_dtype": "dtype", "header_offsets": "data_offsets"}[kind]
        header[key][field] = mutation[3]
        path.write_bytes(_join(header, data))


def check_contract(result: Any, ws: Path, expected_paths: list[str], out: Path, command: str) -> None:
    """Success with a complete output, or one clean error line and nothing left behind."""
    if result.exit_code == 0:
        assert result.exception is None
        if command == "extrapolate":
            tensors = load_file(out / "adapter_model.safetensors")
            assert tensors and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
            json.loads((out / "nextoffline.json").read_text())
            json.loads((out / "adapter_config.json").read_text())
        return
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (
        f"not a clean error: exit {result.exit_code}, {result.exception!r}\n{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, result.stderr
    assert not out.exists()
    assert _paths(ws) == expected_paths, "a failed run left files behind"


@settings(
    max_examples=int(os.environ.get("NEXTOFFLINE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(batch=st.lists(mutations, min_size=1, max_size=2), command=st.sampled_from(["extrapolate", "extrapolate", "inspect"]))
def test_fuzzed_inputs_fail_cleanly_or_succeed(template: Path, batch: list[tuple], command: str) -> None:
    with tempfile.TemporaryDirectory(prefix="nextoffline-fuzz-") as tmp:
        ws = Path(tmp)
        run = ws / "run"
        shutil.copytree(template, run)
        for mutation in batch:
            try:
                apply_mutation(run, mutation)
            except Exception:  # noqa: BLE001  the mutation did not apply (an earlier one broke the file): run the CLI anyway
                pass
        before, expected = _hashes(run), _paths(ws)
        out = ws / "out"
        args = [command, str(run)]
        if command == "extrapolate":
            args += ["--coef", "1", "--method", "linear", "--out", str(out)]
        result = CliRunner().invoke(main, args)
        check_contract(result, ws, expected, out, command)
        assert _hashes(run) == before, "the source was modified"


# ----------------------------------------------------------------------------------------- numerics

NUM_STEPS = (10, 20, 30, 40, 50, 60)
NUM_MODULES = tiny_modules(layers=1)
SCALING = 8.0 / 4


def _run(tmp: Path, name: str, *, transform=None, **spec: Any) -> Path:
    root = tmp / name
    spec = {"law": "sqrt", "noise": 0.02, **spec}
    write_synthetic_trajectory(root, SyntheticSpec(steps=list(NUM_STEPS), modules=NUM_MODULES, **spec))
    if transform is not None:
        for index, step in enumerate(NUM_STEPS):
            path = root / f"step_{step}" / "adapter_model.safetensors"
            tensors = load_file(path)
            save_file({k: transform(k, v, index) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return root


def _cli(*args: Any) -> Any:
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _json(*args: Any) -> Any:
    return json.loads(_cli(*args, "--json").stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def _effective(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "adapter_model.safetensors")
    return {k: SCALING * tensors[k.replace("lora_A", "lora_B")].double() @ v.double() for k, v in tensors.items() if "lora_A" in k}


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _extrapolate(run: Path, out: Path) -> dict[str, torch.Tensor]:
    """``extrapolate --method linear`` succeeds, writes finite factors; returns the effective updates."""
    summary = _json("extrapolate", run, "--to-step", 80, "--method", "linear", "--out", out)
    assert _all_finite(summary["candidates"])
    assert all(torch.isfinite(v).all() for v in load_file(out / "adapter_model.safetensors").values())
    return _effective(out)


def _pipeline(run: Path, out: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """inspect, backtest and extrapolate all succeed with finite (strict JSON) numbers."""
    report = _json("inspect", run)
    assert _all_finite(report["per_step"]) and _all_finite(report["trajectory_explained_variance"])
    backtest = _json("backtest", run, "--methods", "linear,power")
    return report, backtest, _extrapolate(run, out)


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).square().sum()) for k in b)
    den = sum(float(v.square().sum()) for v in b.values())
    return math.sqrt(num / den)


@pytest.fixture(scope="module")
def base_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[dict, dict, dict[str, torch.Tensor]]]:
    tmp = tmp_path_factory.mktemp("numerics-base")
    run = _run(tmp, "base")
    return run, _pipeline(run, tmp / "out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numerics_half_precision_inputs_are_computed_in_fp32(tmp_path: Path, dtype: torch.dtype, base_results) -> None:
    from nextoffline.loader import open_readers, plan_chunks, read_chunk
    from nextoffline.trajectory import load_trajectory

    half = _run(tmp_path, "half", dtype=dtype)
    trajectory = load_trajectory(half)
    with open_readers(trajectory) as readers:
        chunk = read_chunk(plan_chunks(trajectory)[0], trajectory, readers, torch.device("cpu"))
    assert chunk.b.dtype == chunk.a.dtype == torch.float32
    _, _, pred_half = _pipeline(half, tmp_path / "out")
    assert {v.dtype for v in load_file(tmp_path / "out" / "adapter_model.safetensors").values()} == {dtype}
    assert _relative(pred_half, base_results[1][2]) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


@pytest.mark.parametrize("scale", [1e15, 1e-30])
def test_numerics_extreme_scales_match_the_ordinary_run(tmp_path: Path, scale: float, base_results) -> None:
    """Factors ~1e15 or ~1e-30 in fp32: same backtest, same extrapolation up to the scale, no NaN."""
    report0, backtest0, pred0 = base_results[1]
    scaled = _run(tmp_path, "scaled", transform=lambda k, v, i: v * scale)
    report1, backtest1, pred1 = _pipeline(scaled, tmp_path / "out")
    for name, error in backtest0["errors"].items():
        assert backtest1["errors"][name] == pytest.approx(error, rel=1e-3, abs=1e-6)
    for s0, s1 in zip(report0["per_step"], report1["per_step"]):
        assert s1["global_norm"] == pytest.approx(s0["global_norm"] * scale**2, rel=1e-4)
        assert s1["global_rank1_energy"] == pytest.approx(s0["global_rank1_energy"], rel=1e-4)
    assert _relative({k: v / scale**2 for k, v in pred1.items()}, pred0) < 1e-4


def test_numerics_extreme_scale_with_next_predictor(tmp_path: Path) -> None:
    """NExt (an MLP on raw singular values) sees rescaled values: no overflow at ~1e15."""
    run = _run(tmp_path, "huge", transform=lambda k, v, i: v * 1e15)
    _cli("extrapolate", run, "--coef", "1", "--method", "next", "--next-epochs", "1", "--out", tmp_path / "out")
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "out" / "adapter_model.safetensors").values())


def test_numerics_zero_updates(tmp_path: Path) -> None:
    """B = 0 at every step (LoRA's initial state): nothing to extrapolate, nothing breaks."""
    run = _run(tmp_path, "zero", transform=lambda k, v, i: torch.zeros_like(v) if "lora_B" in k else v)
    report, backtest, _ = _pipeline(run, tmp_path / "out")
    assert all(step["global_norm"] == 0 for step in report["per_step"])
    assert set(backtest["errors"].values()) == {1.0} and backtest["best"] is None  # no better than stopping, not "perfect"
    latest = load_file(run / "step_60" / "adapter_model.safetensors")
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(written[k], latest[k]) for k in latest)


def test_numerics_identical_checkpoints(tmp_path: Path) -> None:
    """All checkpoints identical, or a stall in the middle: finite results; stopping wins when nothing moved."""
    first: dict[str, torch.Tensor] = {}
    run = _run(tmp_path, "frozen", transform=lambda k, v, i: first.setdefault(k, v))
    _, backtest, pred = _pipeline(run, tmp_path / "out")
    assert backtest["best"] is None
    assert all(v is None or v >= 1.0 for v in backtest["errors"].values())  # undefined (JSON null) or no better than stopping
    assert _relative(pred, _effective(run / "step_60")) < 1e-5

    stall: dict[str, torch.Tensor] = {}
    stalled = _run(tmp_path, "stalled", transform=lambda k, v, i: stall.setdefault(k, v) if i in (2, 3) else v)  # steps 30 == 40
    _extrapolate(stalled, tmp_path / "out-stalled")


def test_numerics_output_overflowing_its_dtype_is_refused(tmp_path: Path) -> None:
    """An extrapolation beyond float16's range is caught before anything is written."""
    run = _run(tmp_path, "fp16", dtype=torch.float16, law="linear")
    result = CliRunner().invoke(main, ["extrapolate", str(run), "--to-step", "1e9", "--method", "linear", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "are not finite in float16" in result.stderr and "lower the coefficient" in result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
