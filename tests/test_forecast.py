"""Horizon-matched selection: rolling origins, damping, time axes, the new candidates and baselines."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.forecasting import ForecastOptions, available_axes
from nextoffline.ops.chunk import FactorChunk
from nextoffline.ops.forecast import PairSums, TimeAxis, damped_score, lead_in_checkpoints, origin_grid, rolling_origins
from nextoffline.ops.predictors import PREDICTORS, make_predictor
from nextoffline.ops.predictors.base import Predictor
from nextoffline.ops.regressors import make_regressor
from nextoffline.pipeline import NextOptions, PredictorOptions, RunSettings, backtest, extrapolate
from nextoffline.synthetic import SyntheticSpec, forecast_families, progress, synthetic_factors, write_synthetic_trajectory
from nextoffline.trajectory import load_trajectory
from tests.conftest import FIXTURES, effective

FORECAST = FIXTURES / "forecast"
QUIET = RunSettings(device=torch.device("cpu"), progress=False, predictors=PredictorOptions(next=NextOptions(epochs=2)))
NO_NEXT = ForecastOptions(next_budget_s=0.0)


def error_vs_stopping(pred: dict, truth: dict, last: dict) -> float:
    num = sum(float((pred[k] - truth[k]).square().sum()) for k in truth)
    return math.sqrt(num / sum(float((truth[k] - last[k]).square().sum()) for k in truth))


# ------------------------------------------------------------------------------------ pure math


def test_origins_are_shared_and_leads_are_shortened_to_what_the_run_allows() -> None:
    assert origin_grid(12, min_fit=3, size=5) == [2, 4, 6, 8, 10]
    assert rolling_origins(12, 2, [2, 4, 6, 8, 10], origins=3) == (2, [4, 6, 8])
    assert rolling_origins(12, 12, [2, 4, 6, 8, 10], origins=3) == (9, [2])  # 12 ahead: the earliest origin scores 9
    assert lead_in_checkpoints([10, 20, 30], 30) == 0 and lead_in_checkpoints([10, 20, 30], 61) == 3
    assert lead_in_checkpoints([10, 15, 30], 40) == 1  # mean cadence 10


def test_damped_score_matches_brute_force_leave_one_out() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(4):
        d, t = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
        t = 0.6 * d + 0.5 * t
        pairs.append(PairSums(float(d @ d), float(d @ t), float(t @ t), float((d - t) @ (d - t))))
    score = damped_score(pairs)
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)

    def best_a(ps):
        losses = torch.stack([sum(a * a * p.dd - 2 * a * p.dt + p.tt for p in ps) for a in grid])
        return float(grid[losses.argmin()])

    assert score.damping == pytest.approx(best_a(pairs), abs=2e-4)
    held_out = sum(p.at(best_a([q for q in pairs if q is not p])) for p in pairs)
    assert score.damped_error == pytest.approx(math.sqrt(held_out / sum(p.tt for p in pairs)), rel=1e-3)
    assert score.error == pytest.approx(math.sqrt(sum(p.error for p in pairs) / sum(p.tt for p in pairs)))
    assert score.band[0] <= score.damped_error <= score.band[1]
    opposite = [PairSums(1.0, -1.0, 1.0, 4.0)]  # the forecast points the wrong way: damping 0 = stopping
    assert damped_score(opposite).damping == 0.0 and damped_score(opposite).damped_error == pytest.approx(1.0)


def test_cumulative_learning_rate_axis() -> None:
    axis = TimeAxis("lr", [(0, 0.0), (10, 1.0), (20, 0.5)])  # warmup, then linear decay
    assert axis(10) == pytest.approx(5.0) and axis(20) == pytest.approx(12.5)
    assert axis(30) == pytest.approx(12.5 + 2.5)  # the decay line continued until the rate reaches 0 at step 30
    assert axis(100) == pytest.approx(15.0)  # and no progress after it
    assert TimeAxis("log")(math.e - 1) == pytest.approx(1.0) and TimeAxis()(7) == 7


@pytest.mark.parametrize(
    "name, law", [("log", lambda t: 2.0 + 3.0 * math.log1p(t / 60.0)), ("sat", lambda t: 5.0 - 4.0 * math.exp(-t / 50.0))]
)
def test_log_and_saturating_trends_recover_their_laws(name: str, law) -> None:
    x = torch.tensor([[10.0, 20, 30, 40, 50, 60]], dtype=torch.float64)
    y = torch.tensor([[law(float(t)) for t in x[0]]], dtype=torch.float64)
    fitted = make_regressor(name).fit(x, y)
    error = abs(float(fitted.predict(torch.tensor(120.0))[0]) - law(120.0)) / abs(law(120.0) - law(60.0))
    assert error < 1e-8  # the law's shape parameter is on the grid


# ------------------------------------------------------------------------------------ predictors


def _chunk(step_values, dense_at, m=6, n=5) -> FactorChunk:
    """A chunk whose factors are exact rank-(m) factorisations of dense updates (B = dW, A = I-like)."""
    k = len(step_values)
    b = torch.stack([dense_at(t) for t in step_values]).unsqueeze(1)  # (K, 1, m, n): B = dW, A = I
    a = torch.eye(n, dtype=torch.float64).expand(k, 1, n, n).clone()
    return FactorChunk(["x"], torch.tensor(step_values, dtype=torch.float64), b, a, torch.ones(1, dtype=torch.float64))


def _dense_update(predictor: Predictor, chunk: FactorChunk, target: float) -> torch.Tensor:
    predictor.observe(chunk)
    update = predictor.predict_update(chunk, target)
    return (update.left @ update.right)[0]


def test_rank_k_trend_is_exact_where_the_top_direction_is_not() -> None:
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    chunk = _chunk([10.0, 20, 30, 40, 50], lambda t: x0 + t * x1 / 10)  # two temporal directions, each linear
    truth = (x0 + 90 * x1 / 10) - (x0 + 50 * x1 / 10)
    rotate = _dense_update(make_predictor("rotate", horizon=1), chunk, 90.0)
    relex = _dense_update(make_predictor("linear", horizon=1), chunk, 90.0)
    assert torch.allclose(rotate, truth, atol=1e-8)
    assert (relex - truth).norm() > 1e-3 * truth.norm()


def test_baselines_against_their_dense_definitions() -> None:
    gen = torch.Generator().manual_seed(2)
    xs = {t: torch.randn(6, 5, generator=gen, dtype=torch.float64) for t in (10.0, 20, 30, 40)}
    chunk = _chunk(list(xs), xs.__getitem__)
    expo = _dense_update(make_predictor("expo", horizon=1), chunk, 60.0)
    assert torch.allclose(expo, 2 * (xs[40] - xs[30]), atol=1e-10)
    lawa = _dense_update(make_predictor("lawa@3", horizon=1), chunk, 60.0)
    assert torch.allclose(lawa, (xs[20] + xs[30] + xs[40]) / 3 - xs[40], atol=1e-10)
    ema = _dense_update(make_predictor("ema@2", horizon=1), chunk, 60.0)
    assert torch.allclose(ema, (xs[30] + 2 * xs[40]) / 3 - xs[40], atol=1e-10)
    u, _s, vh = torch.linalg.svd(xs[40])
    coefs = torch.tensor([float(u[:, 0] @ xs[t] @ vh[0]) for t in xs], dtype=torch.float64)
    steps = torch.tensor(list(xs), dtype=torch.float64)
    slope = float(((steps - steps.mean()) * (coefs - coefs.mean())).sum() / (steps - steps.mean()).square().sum())
    alpharl = _dense_update(make_predictor("alpharl", horizon=1), chunk, 60.0)
    assert torch.allclose(alpharl, slope * 20 * torch.outer(u[:, 0], vh[0]), atol=1e-8)


def test_a_trend_on_the_log_axis_is_exact_for_a_log_law() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    chunk = _chunk([10.0, 20, 40, 80], lambda t: math.log1p(t) * x)
    axes = {"log": TimeAxis("log")}
    on_log = _dense_update(make_predictor("linear:log", horizon=1, axes=axes), chunk, 320.0)
    assert torch.allclose(on_log, (math.log1p(320) - math.log1p(80)) * x, atol=1e-8)


# ------------------------------------------------------------------------------ the backtest


class _Recorder(Predictor):
    """Records the steps each fit saw and the target of each prediction."""

    name = "recorder"
    fits_per_chunk = True
    seen: list[tuple[float, float]] = []

    def observe(self, chunk: FactorChunk) -> None:
        self.last = float(chunk.steps[-1])

    def predict_update(self, chunk: FactorChunk, target_step: float):
        from nextoffline.ops.predictors.base import FactoredUpdate

        _Recorder.seen.append((float(chunk.steps[-1]), target_step))
        return FactoredUpdate(torch.zeros_like(chunk.b[-1][..., :1]), torch.zeros_like(chunk.a[-1][..., :1, :]))

    def settings(self) -> dict:
        return {}


def test_rolling_origins_use_only_past_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PREDICTORS, "recorder", lambda **_: _Recorder())
    _Recorder.seen = []
    trajectory = load_trajectory(FORECAST / "saturating" / "observed")
    result = backtest(trajectory, ["recorder"], QUIET, targets=[140.0, 240.0], forecast=NO_NEXT)
    assert _Recorder.seen and all(target > last for last, target in _Recorder.seen)  # always predicting an unseen step
    plans = {p.target_step: p for p in result.targets}
    assert plans[140.0].lead == 2 and plans[140.0].scored_lead == 2 and len(plans[140.0].origin_steps) == 3
    assert plans[240.0].lead == 12 and plans[240.0].scored_lead == 9 and plans[240.0].origin_steps == [30]
    seen = set(_Recorder.seen)
    for plan in plans.values():
        for origin in plan.origin_steps:
            assert (float(origin), float(origin + 10 * plan.scored_lead)) in seen
    assert plans[140.0].scores["recorder"].error == pytest.approx(1.0)  # a zero update is stopping


def test_backtest_scores_do_not_depend_on_checkpoints_after_each_origin(tmp_path: Path) -> None:
    """Changing the last checkpoint changes only the pairs that score against it."""
    family = forecast_families()["saturating"]
    write_synthetic_trajectory(tmp_path / "a", family.spec)
    write_synthetic_trajectory(tmp_path / "b", replace(family.spec, steps=family.spec.steps[:-1]))
    write_synthetic_trajectory(tmp_path / "b", replace(family.spec, steps=[120], noise=0.5, seed=9))
    scores = {}
    for run in ("a", "b"):
        trajectory = load_trajectory(tmp_path / run)
        scores[run] = backtest(trajectory, ["linear@3", "expo"], QUIET, targets=[140.0], forecast=NO_NEXT).targets[0]
    origins = scores["a"].origin_steps
    assert origins == [50, 70, 90] and scores["a"].scored_lead == 2  # the last scored checkpoint is step 110 < 120
    for name in ("linear@3", "expo"):
        assert scores["a"].scores[name].per_origin == pytest.approx(scores["b"].scores[name].per_origin, rel=1e-9)


def test_time_axis_read_from_trainer_state() -> None:
    family = forecast_families()["schedule"]
    trajectory = load_trajectory(FORECAST / "schedule" / "observed")
    axes, missing = available_axes(trajectory, ForecastOptions())
    assert "lr" in axes and not missing
    values = axes["lr"].map(trajectory.step_numbers)
    expected = [1e-5 * progress(family.spec, s) for s in trajectory.step_numbers]
    offsets = [v - e for v, e in zip(values, expected)]  # logs start at step 5: a constant offset before it
    assert max(offsets) - min(offsets) < 1e-8 * max(values)  # logged rates are rounded
    plain = load_trajectory(FORECAST / "saturating" / "observed")
    axes, missing = available_axes(plain, ForecastOptions())
    assert "lr" not in axes and "trainer_state.json" in missing["lr"]
    grpo = load_trajectory(Path(__file__).resolve().parent.parent / "nextoffline" / "data" / "example_grpo")
    assert "lr" in available_axes(grpo, ForecastOptions())[0]  # TRL logs learning_rate


def test_uneven_cadence_is_scored_at_real_steps() -> None:
    trajectory = load_trajectory(FORECAST / "uneven" / "observed")
    result = backtest(trajectory, ["linear", "power"], QUIET, targets=[140.0], forecast=NO_NEXT)
    plan = result.targets[0]
    assert plan.lead == 2 and plan.origin_steps == [35, 60, 80]  # indices 4, 6, 8 of 10,15,20,30,35,50,60,65,80,100,105,120
    assert plan.scores["power"].damped_error < 0.5


# --------------------------------------------------------------------------------- extrapolate


def test_damping_zero_returns_the_latest_exactly(tmp_path: Path) -> None:
    trajectory = load_trajectory(FORECAST / "noisy" / "observed")
    result = extrapolate(trajectory, QUIET, coefs=[0.0, 1.0], forecast=NO_NEXT)
    latest = load_file(trajectory.latest.weights_file)
    by_coef = {c.coef: c for c in result.candidates}
    assert all(torch.equal(by_coef[0.0].tensors[k], latest[k]) for k in latest)  # lead 0: a = 0, bit for bit
    if result.method != "none":
        record = result.forecast[0]
        assert 0.0 <= record["damping"] <= 1.0 and record["lead_checkpoints"] >= 1


def test_damping_scales_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    import nextoffline.pipeline as pipeline

    trajectory = load_trajectory(FORECAST / "saturating" / "observed")
    full = extrapolate(trajectory, QUIET, method="linear", to_steps=[200.0])
    seen = {}

    def half(report, best, targets, options):
        seen["called"] = True
        return {t.step: 0.5 for t in targets}, []

    monkeypatch.setattr(pipeline, "_dampings", half)
    damped = extrapolate(trajectory, QUIET, to_steps=[200.0], forecast=NO_NEXT)
    assert seen and damped.method != "none"
    again = extrapolate(trajectory, QUIET, method=damped.method, to_steps=[200.0])
    latest = effective(load_file(trajectory.latest.weights_file), 2.0)
    for key, value in effective(damped.candidates[0].tensors, 2.0).items():
        expected = latest[key] + 0.5 * (effective(again.candidates[0].tensors, 2.0)[key] - latest[key])
        assert torch.allclose(value, expected, rtol=1e-3, atol=1e-5), key
    assert full.candidates[0].relative_update > 0


@pytest.mark.parametrize("family", ["saturating", "rotating"])
def test_auto_beats_stopping_on_saturating_and_rotating_families(family: str) -> None:
    trajectory = load_trajectory(FORECAST / family / "observed")
    targets = [140.0, 240.0]  # 0.2x and 1x the observed length ahead
    result = extrapolate(trajectory, QUIET, to_steps=targets, forecast=NO_NEXT)
    assert result.method != "none"
    last = effective(load_file(trajectory.latest.weights_file), 2.0)
    for target, candidate in zip(targets, result.candidates):
        truth = effective(load_file(FORECAST / family / "future" / f"step_{int(target)}" / "adapter_model.safetensors"), 2.0)
        assert error_vs_stopping(effective(candidate.tensors, 2.0), truth, last) < 0.6, (family, target)


def test_auto_on_the_bundled_grpo_run() -> None:
    """The real run: auto keeps the latest weights, or moves with a predictor whose damped
    rolling-origin error beats stopping at every target (the refusal itself is
    test_extrapolate.test_auto_keeps_latest_when_nothing_beats_stopping)."""
    from nextoffline.pipeline import AUTO_MAX_ERROR

    trajectory = load_trajectory(Path(__file__).resolve().parent.parent / "nextoffline" / "data" / "example_grpo")
    targets = [9.0, 11.0]  # coefficients 1/3 and 1 of the default horizon
    result = extrapolate(trajectory, QUIET, to_steps=targets, forecast=NO_NEXT)
    latest = load_file(trajectory.latest.weights_file)
    if result.method == "none":
        assert all(torch.equal(c.tensors[k], latest[k]) for c in result.candidates for k in latest)
    else:
        assert all(r["damped_error"] < AUTO_MAX_ERROR and 0 <= r["damping"] <= 1 for r in result.forecast)


def test_backtest_json_and_manifest_carry_per_target_errors(tmp_path: Path) -> None:
    run = FORECAST / "saturating" / "observed"
    result = CliRunner().invoke(
        main, ["backtest", str(run), "--json", "--to-step", "140,240", "--methods", "linear,expo,lawa", "--quiet"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["target_step"] for t in report["targets"]] == [140.0, 240.0]
    for target in report["targets"]:
        assert set(target["scores"]) == {"linear", "expo", "lawa"}
        for score in target["scores"].values():
            assert {"error", "damped_error", "damping", "band", "per_origin"} <= set(score)
    assert report["best"] != "lawa"  # denoisers are shown, never selected
    text = CliRunner().invoke(main, ["backtest", str(run), "--to-step", "140", "--methods", "linear,expo", "--quiet"]).output
    assert "damped = last + a * (forecast - last)" in text and "2 checkpoints ahead" in text and "time axes:" in text
    out = tmp_path / "out"
    args = ["extrapolate", str(run), "--to-step", "140", "--out", str(out), "--next-budget", "0", "--quiet", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["extrapolation"]["backtest"]["targets"][0]["lead_checkpoints"] == 2
    assert manifest["extrapolation"]["forecast"][0]["damping"] == json.loads(result.stdout)["forecast"][0]["damping"]
    assert any("auto skipped next" in n for n in manifest["extrapolation"]["backtest"]["notes"])


def test_next_budget_is_projected_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import nextoffline.ops.predictors.next as next_module

    trajectory = load_trajectory(FORECAST / "rotating" / "observed")
    trained = []
    monkeypatch.setattr(next_module.NextPredictor, "fit", lambda self: trained.append(1))
    result = backtest(trajectory, ["linear", "next"], QUIET, targets=[140.0], forecast=NO_NEXT, budget_next=True)
    assert not trained and "next" not in result.targets[0].scores and "auto skipped next" in result.notes[-1]


# ---------------------------------------------------------------------------------- fixtures


def test_forecast_fixtures_are_reproducible(tmp_path: Path) -> None:
    script = FIXTURES / "make_forecast_fixtures.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in forecast_families():
        for part in ("observed", "future"):
            ours = sorted(p.relative_to(tmp_path) for p in (tmp_path / name / part).rglob("*") if p.is_file())
            theirs = sorted(p.relative_to(FORECAST) for p in (FORECAST / name / part).rglob("*") if p.is_file())
            assert ours == theirs
            for path in ours:
                if path.suffix == ".safetensors":
                    a, b = load_file(tmp_path / path), load_file(FORECAST / path)
                    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in b), path
                elif path.suffix == ".json":
                    assert json.loads((tmp_path / path).read_text()) == json.loads((FORECAST / path).read_text())  # plain Python floats


def test_family_laws_hold_in_the_fixture() -> None:
    family = forecast_families()["rotating"]
    written = load_file(FORECAST / "rotating" / "future" / "step_200" / "adapter_model.safetensors")
    name = family.spec.modules[0][0]
    b, _a = synthetic_factors(replace(family.spec, steps=[200]), 200, 0)
    assert torch.allclose(written[f"base_model.model.{name}.lora_B.weight"].double(), b, rtol=1e-5, atol=1e-6)
    assert isinstance(family.spec, SyntheticSpec)
