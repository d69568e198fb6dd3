"""End-to-end extrapolation through the CLI: exactness on known laws, coefficient 0, PEFT loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.synthetic import SyntheticSpec, synthetic_factors, write_synthetic_trajectory
from tests.conftest import effective, make_trajectory, tree_hashes


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"], catch_exceptions=False)
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def truth_at(step: int, law: str, **spec) -> dict[str, torch.Tensor]:
    full = SyntheticSpec(steps=[step], law=law, **spec)
    result = {}
    for index, (name, _o, _i) in enumerate(full.modules):
        b, a = synthetic_factors(full, step, index)
        result[f"base_model.model.{name}"] = (full.alpha / full.rank) * b @ a
    return result


def relative_error(pred: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    num = sum(float((pred[k] - truth[k]).square().sum()) for k in truth)
    den = sum(float(t.square().sum()) for t in truth.values())
    return (num / den) ** 0.5


def test_linear_law_is_extrapolated_exactly(tmp_path: Path, linear_run: Path) -> None:
    code, out = run_cli("extrapolate", linear_run, "--to-step", "120", "--method", "linear", "--out", tmp_path / "out", "--device", "cpu")
    assert code == 0, out
    pred = effective(load_file(tmp_path / "out" / "adapter_model.safetensors"), 8 / 4)
    assert relative_error(pred, truth_at(120, "linear")) <= 1e-3


def test_nonlinear_law_auto_beats_linear(tmp_path: Path, sqrt_run: Path) -> None:
    errors = {}
    for method in ("linear", "auto"):
        code, out = run_cli(
            "extrapolate", sqrt_run, "--to-step", "120", "--method", method, "--out", tmp_path / method, "--next-epochs", "50"
        )
        assert code == 0, out
        pred = effective(load_file(tmp_path / method / "adapter_model.safetensors"), 8 / 4)
        errors[method] = relative_error(pred, truth_at(120, "sqrt"))
    assert errors["auto"] < 0.25 * errors["linear"], errors
    manifest = json.loads((tmp_path / "auto" / "nextoffline.json").read_text())
    assert manifest["extrapolation"]["backtest"]["best"] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_coef_zero_returns_latest_adapter(tmp_path: Path, dtype: torch.dtype) -> None:
    run = make_trajectory(tmp_path / "run", law="sqrt", noise=0.05, a_drift=0.1, dtype=dtype)
    code, out = run_cli("extrapolate", run, "--coef", "0", "--method", "linear", "--out", tmp_path / "out")
    assert code == 0, out
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    latest = load_file(run / "step_80" / "adapter_model.safetensors")
    assert written.keys() == latest.keys()
    for key in latest:
        assert written[key].shape == latest[key].shape and written[key].dtype == latest[key].dtype
    assert relative_error(effective(written, 2.0), effective(latest, 2.0)) <= 1e-6
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == json.loads(
        (run / "step_80" / "adapter_config.json").read_text()
    )


def test_single_target_writes_one_adapter_and_never_touches_source(tmp_path: Path, sqrt_run: Path) -> None:
    before = tree_hashes(sqrt_run)
    code, out = run_cli("extrapolate", sqrt_run, "--coef", "1", "--method", "power", "--out", tmp_path / "out")
    assert code == 0, out
    assert tree_hashes(sqrt_run) == before
    assert [p.name for p in (tmp_path / "out").rglob("adapter_model.safetensors")] == ["adapter_model.safetensors"]
    manifest = json.loads((tmp_path / "out" / "nextoffline.json").read_text())
    assert manifest["source"]["steps"] == list(range(10, 90, 10))
    files = manifest["source"]["files"]
    assert [f["step"] for f in files] == list(range(10, 90, 10))
    for record in files:  # each hash belongs to its own file (hashed in parallel)
        assert record["weights_sha256"] == hashlib.sha256(Path(record["weights"]).read_bytes()).hexdigest()
    assert manifest["selected"]["coef"] == 1.0 and 0 <= manifest["selected"]["kept_energy"] <= 1
    assert "Extrapolated LoRA adapter" in (tmp_path / "out" / "README.md").read_text()


def test_output_loads_with_peft(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_trajectory(tmp_path / "run", law="sqrt", noise=0.05)
    for policy in ("keep", "grow"):
        code, out = run_cli(
            "extrapolate", run, "--coef", "1", "--method", "next", "--next-epochs", "5", "--rank-policy", policy, "--out", tmp_path / policy
        )
        assert code == 0, out
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / policy)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        a = layer.lora_A["default"].weight
        assert a.shape[0] == (4 if policy == "keep" else 5)  # next predicts a rank-1 update: r + 1 when grown
        written = load_file(tmp_path / policy / "adapter_model.safetensors")
        torch.testing.assert_close(a.detach(), written["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_grow_rank_is_exact(tmp_path: Path) -> None:
    run = make_trajectory(tmp_path / "run", law="sqrt", noise=0.05, a_drift=0.2)
    outs = {}
    for policy in ("keep", "grow"):
        code, out = run_cli("extrapolate", run, "--coef", "2", "--method", "linear@3", "--rank-policy", policy, "--out", tmp_path / policy)
        assert code == 0, out
        config = json.loads((tmp_path / policy / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        outs[policy] = (effective(load_file(tmp_path / policy / "adapter_model.safetensors"), scale), config)
    assert outs["grow"][1]["lora_alpha"] / outs["grow"][1]["r"] == pytest.approx(2.0) and outs["grow"][1]["r"] > 4
    # keep is the best rank-r approximation of the exact (grow) result: close but not better than it
    assert relative_error(outs["keep"][0], outs["grow"][0]) < 0.1


def test_sweep_without_eval_writes_subfolders(tmp_path: Path, linear_run: Path) -> None:
    code, out = run_cli("extrapolate", linear_run, "--coef", "0.5,1", "--to-step", "150", "--method", "linear", "--out", tmp_path / "out")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["coef_0.5", "coef_1", "step_150"]


def test_next_predictor_is_deterministic_on_cpu(tmp_path: Path, sqrt_run: Path) -> None:
    outputs = []
    for i in range(2):
        code, out = run_cli("extrapolate", sqrt_run, "--coef", "1", "--method", "next", "--next-epochs", "30", "--out", tmp_path / f"n{i}")
        assert code == 0, out
        outputs.append(load_file(tmp_path / f"n{i}" / "adapter_model.safetensors"))
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key])
    latest = load_file(sqrt_run / "step_80" / "adapter_model.safetensors")
    assert any(not torch.equal(outputs[0][k], latest[k]) for k in latest)


def test_json_outputs(tmp_path: Path, sqrt_run: Path) -> None:
    code, out = run_cli("inspect", sqrt_run, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "peft" and report["steps"] == list(range(10, 90, 10)) and report["num_modules"] == 14
    assert {"global_rank1_energy", "local_rank1_energy", "step", "global_norm"} <= set(report["per_step"][0])
    assert 0.99 <= report["trajectory_explained_variance"] <= 1.0
    code, out = run_cli("backtest", sqrt_run, "--json", "--methods", "linear,power,next", "--next-epochs", "20")
    result = json.loads(out)
    assert code == 0 and set(result["errors"]) == {"linear", "power", "next"} and result["heldout_steps"] == [70, 80]
    assert result["errors"]["power"] < result["errors"]["linear"] < 1.0


def test_explicit_adapters(tmp_path: Path) -> None:
    write_synthetic_trajectory(tmp_path / "a", SyntheticSpec(steps=[10, 20, 30, 40], law="linear"))
    args = [f"--adapter={s}={tmp_path / 'a' / f'step_{s}'}" for s in (10, 20, 30, 40)]
    code, out = run_cli("extrapolate", *args, "--to-step", "60", "--method", "linear", "--out", tmp_path / "out")
    assert code == 0, out


@pytest.mark.parametrize("command", ["inspect", "backtest", "extrapolate"])
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_chunk_budget_is_the_library_default() -> None:
    """Benchmarks measure the library default; the CLI must run with the same budget."""
    from nextoffline.cli.options import DEFAULT_CHUNK_MB
    from nextoffline.loader import DEFAULT_CHUNK_BYTES

    assert DEFAULT_CHUNK_MB * 2**20 == DEFAULT_CHUNK_BYTES
    result = CliRunner().invoke(main, ["extrapolate", "--help"])
    assert f"[default: {DEFAULT_CHUNK_MB};" in " ".join(result.output.split())


def test_auto_keeps_latest_when_nothing_beats_stopping(tmp_path: Path) -> None:
    run = make_trajectory(tmp_path / "run", law="constant", noise=0.5)
    code, out = run_cli("extrapolate", run, "--coef", "1", "--method", "auto", "--next-epochs", "20", "--out", tmp_path / "out", "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["method"] == "none" and "kept unchanged" in summary["note"]
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    latest = load_file(run / "step_80" / "adapter_model.safetensors")
    assert all(torch.equal(written[k], latest[k]) for k in latest)
    manifest = json.loads((tmp_path / "out" / "nextoffline.json").read_text())
    assert manifest["extrapolation"]["method"] == "none" and manifest["extrapolation"]["backtest"]["best"] is None


def _dora(run: Path) -> None:
    config = json.loads((run / "step_10" / "adapter_config.json").read_text())
    config["use_dora"] = True
    (run / "step_10" / "adapter_config.json").write_text(json.dumps(config))


def _mismatch_rank(run: Path) -> None:
    write_synthetic_trajectory(run, SyntheticSpec(steps=[20], rank=2, alpha=4.0))


@pytest.mark.parametrize(
    "case, prepare, needle",
    [
        ("missing", None, "does not exist"),
        ("empty", lambda run: None, "no checkpoints found"),
        ("two_steps", lambda run: write_synthetic_trajectory(run, SyntheticSpec(steps=[10, 20])), "at least 3"),
        ("rank_mismatch", lambda run: (write_synthetic_trajectory(run, SyntheticSpec(steps=[10, 30, 40])), _mismatch_rank(run)), "differs"),
        ("dora", lambda run: (write_synthetic_trajectory(run, SyntheticSpec(steps=[10, 20, 30])), _dora(run)), "DoRA"),
    ],
)
def test_bad_sources_give_one_line_errors(tmp_path: Path, case: str, prepare, needle: str) -> None:
    run = tmp_path / "run"
    if prepare is not None:
        run.mkdir()
        prepare(run)
    result = CliRunner().invoke(main, ["extrapolate", str(run), "--coef", "1", "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and needle in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,passes", [("linear", 1), ("power@3", 1), ("next", 2)])
def test_per_chunk_predictors_read_the_trajectory_once(linear_run: Path, monkeypatch: pytest.MonkeyPatch, method: str, passes: int) -> None:
    """Trajectory predictors observe and predict each chunk in one pass; NExt needs a fit in between."""
    import nextoffline.pipeline as pipeline
    from nextoffline.trajectory import load_trajectory

    calls = []
    original = pipeline.stream_chunks

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "stream_chunks", counting)
    trajectory = load_trajectory(linear_run)
    settings = pipeline.RunSettings(
        device=torch.device("cpu"), progress=False, predictors=pipeline.PredictorOptions(next=pipeline.NextOptions(epochs=2))
    )
    single = pipeline.extrapolate(trajectory, settings, method=method, coefs=[1.0])
    assert len(calls) == passes
    if method == "linear":  # same answer as observing every chunk first (Grams recomputed), then predicting
        predictors, _failures = pipeline.fit_predictors(
            trajectory, ["linear"], settings, list(range(len(trajectory.steps))), single.horizon
        )
        two_pass = pipeline.build_candidates(
            trajectory, predictors["linear"], [pipeline.Target(single.candidates[0].target_step, 1.0)], "keep", settings
        )
        for key, value in single.candidates[0].tensors.items():
            assert torch.allclose(value, two_pass[0].tensors[key], rtol=1e-4, atol=1e-7), key


def test_next_training_in_slices_matches_the_full_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded-memory training (gradients summed over row slices) is the same full-batch fit."""
    import nextoffline.ops.predictors.next as next_module
    from nextoffline.ops.chunk import FactorChunk

    gen = torch.Generator().manual_seed(3)
    k, n_mod, m, n, r = 7, 3, 24, 16, 2
    chunk = FactorChunk(
        [f"m{i}" for i in range(n_mod)],
        torch.arange(k, dtype=torch.float64) * 10,
        torch.randn(k, n_mod, m, r, generator=gen).cumsum(0),
        torch.randn(k, n_mod, r, n, generator=gen).cumsum(0),
        torch.full((n_mod,), 2.0),
    )
    predictions = []
    for activation_bytes in (2**30, 4 * 16 * 3):  # one slice; slices of 3 rows at d = 16 (many at d = 24)
        monkeypatch.setattr(next_module, "ACTIVATION_BYTES", activation_bytes)
        predictor = next_module.NextPredictor(horizon=2, epochs=25, lr=1e-3)
        predictor.observe(chunk)
        predictor.fit()
        predictions.append((predictor._predicted[tuple(chunk.names)], dict(predictor.training_loss)))
    (full, full_loss), (sliced, sliced_loss) = predictions
    for kind in ("u", "v", "sigma"):
        assert torch.allclose(full[kind], sliced[kind], rtol=1e-4, atol=1e-6), kind
    assert full_loss.keys() == sliced_loss.keys()
    for label, value in full_loss.items():
        assert abs(value - sliced_loss[label]) <= 1e-4 * max(abs(value), 1e-12), label


@pytest.mark.parametrize("method", ["auto", "linear", "power@3", "next"])
def test_reused_chunk_memory_changes_no_result(linear_run: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The pipeline reuses chunk memory; a predictor keeping views of a chunk would show up here
    against private copies of every chunk (one module per chunk: each overwrites the previous)."""
    import nextoffline.pipeline as pipeline
    from nextoffline.ops.chunk import FactorChunk
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(linear_run)
    settings = pipeline.RunSettings(
        device=torch.device("cpu"), progress=False, predictors=pipeline.PredictorOptions(next=pipeline.NextOptions(epochs=3)), chunk_bytes=1
    )
    assert len(pipeline.plan_chunks(trajectory, budget_bytes=1)) == len(trajectory.modules) > 1
    reused = pipeline.extrapolate(trajectory, settings, method=method, coefs=[1.0, 2.0])
    original = pipeline.stream_chunks

    def private_copies(*args, **kwargs):
        for plan, chunk in original(*args, **kwargs):
            yield plan, FactorChunk(chunk.names, chunk.steps.clone(), chunk.b.clone(), chunk.a.clone(), chunk.scaling.clone())

    monkeypatch.setattr(pipeline, "stream_chunks", private_copies)
    fresh = pipeline.extrapolate(trajectory, settings, method=method, coefs=[1.0, 2.0])
    assert reused.method == fresh.method
    if reused.backtest is not None:
        assert reused.backtest.errors == pytest.approx(fresh.backtest.errors, rel=1e-9)
    for ours, theirs in zip(reused.candidates, fresh.candidates):
        for key, value in ours.tensors.items():
            assert torch.allclose(value.double(), theirs.tensors[key].double(), rtol=1e-6, atol=1e-9), key


def test_backtest_scores_from_the_trajectory_gram_match_the_factored_difference(sqrt_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELEX-style updates are scored by a quadratic form of the (memoised, float64) trajectory
    Gram; the generic path (Grams of the stacked difference) must give the same errors."""
    import nextoffline.pipeline as pipeline
    from nextoffline.ops.predictors.trajectory import WindowUpdate
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(sqrt_run)
    settings = pipeline.RunSettings(device=torch.device("cpu"), progress=False, chunk_bytes=1)
    methods = ["linear@3", "power@5", "linear", "poly"]
    fast = pipeline.backtest(trajectory, methods, settings)
    memoised = []
    monkeypatch.setattr(pipeline, "shared_trajectory_gram", lambda *args: memoised.append(1) or pytest.fail("over budget"))
    monkeypatch.setattr(pipeline, "GRAM_CACHE_MIN_BYTES", 0)  # Grams over the chunk budget: not memoised
    over_budget = pipeline.backtest(trajectory, methods, settings)
    assert not memoised and over_budget.errors == pytest.approx(fast.errors, rel=1e-5, abs=1e-3)
    monkeypatch.undo()
    monkeypatch.setattr(WindowUpdate, "step_combination", lambda self: None)
    generic = pipeline.backtest(trajectory, methods, settings)
    assert fast.errors.keys() == generic.errors.keys() == set(methods)
    for name in methods:
        # the generic path sums float32 Gram products: relative noise ~1e-6 on real errors, and an
        # error near 0 is the square root of cancellation noise (~1e-4); the fast path is float64
        # (its exactness on a linear law is checked in test_report)
        assert fast.errors[name] == pytest.approx(generic.errors[name], rel=1e-5, abs=1e-3), name
        assert fast.per_step[name] == pytest.approx(generic.per_step[name], rel=1e-5, abs=1e-3), name
    assert max(fast.errors.values()) > 0.01  # the law is not linear: real errors are compared


def test_window_grams_of_a_selection_are_slices_of_the_memoised_ones() -> None:
    from nextoffline.ops.chunk import FactorChunk
    from nextoffline.ops.predictors.trajectory import memoise_window_grams, window_grams

    gen = torch.Generator().manual_seed(4)
    k, n_mod, m, n, r = 6, 2, 20, 12, 3
    chunk = FactorChunk(
        ["x", "y"],
        torch.arange(k, dtype=torch.float64),
        torch.randn(k, n_mod, m, r, generator=gen),
        torch.randn(k, n_mod, r, n, generator=gen),
        torch.tensor([2.0, 0.5]),
    )
    alone = FactorChunk(chunk.names, chunk.steps, chunk.b, chunk.a, chunk.scaling)  # its own (empty) cache
    direct = {steps: window_grams(alone.select_steps(list(steps))) for steps in [(1, 2, 3), (0, 2, 5)]}
    assert window_grams(alone.select_steps([1, 2, 3])) is direct[(1, 2, 3)]  # memoised per window
    memoised = memoise_window_grams(chunk, torch.float64)
    assert memoised.b.dtype == torch.float64 and memoise_window_grams(chunk) is memoised
    prefix = chunk.select_steps([0, 1, 2, 3, 4])
    assert prefix.step_origin == (0, 1, 2, 3, 4) and prefix.select_steps([1, 2, 3]).step_origin == (1, 2, 3)
    for steps, expected in direct.items():
        ours = window_grams(prefix.select_steps(list(steps)) if max(steps) < 5 else chunk.select_steps(list(steps)))
        shared = ours.b.untyped_storage().data_ptr() == memoised.b.untyped_storage().data_ptr()
        assert shared == (steps == (1, 2, 3))  # a contiguous run is a view of the shared Grams, others are computed
        assert torch.allclose(ours.b.double(), expected.b.double(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(ours.a.double(), expected.a.double(), rtol=1e-5, atol=1e-5)


def test_next_announces_long_training(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A user waiting on the reference 1000 epochs is told how long, after the first epoch."""
    import logging

    import nextoffline.ops.predictors.next as next_module
    from nextoffline.ops.chunk import FactorChunk

    gen = torch.Generator().manual_seed(8)
    k, n_mod, m, n, r = 5, 2, 12, 10, 2
    chunk = FactorChunk(
        ["p", "q"],
        torch.arange(k, dtype=torch.float64),
        torch.randn(k, n_mod, m, r, generator=gen).cumsum(0),
        torch.randn(k, n_mod, r, n, generator=gen).cumsum(0),
        torch.full((n_mod,), 2.0),
    )
    for threshold, announced in ((1e9, False), (0.0, True)):
        monkeypatch.setattr(next_module, "LONG_TRAINING_S", threshold)
        caplog.clear()
        predictor = next_module.NextPredictor(horizon=1, epochs=3)
        predictor.observe(chunk)
        with caplog.at_level(logging.WARNING, logger="nextoffline.ops.predictors.next"):
            predictor.fit()
        warnings = [rec.getMessage() for rec in caplog.records if "lower --next-epochs" in rec.getMessage()]
        assert len(warnings) == (len(predictor.training_loss) if announced else 0), warnings  # one per network
        assert all("3 epochs" in w for w in warnings)
