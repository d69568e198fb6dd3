"""Full-parameter runs with the LoRA path's methods: sweeps (one HF model folder per candidate, the
trajectory read once), --eval-cmd with --keep-all, --max-step, and `report` on a full-parameter run."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from tests.conftest import FIXTURES

sys.path.insert(0, str(FIXTURES))
from make_fullparam_fixture import law_weights

RUN = FIXTURES / "fullparam_sqrt"
BASE = FIXTURES / "tiny_base"
WEIGHTS = "model.safetensors"


def run_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def single_coef_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--method", "power", "--out", out)
    assert code == 0, output
    return out


def test_sweep_writes_one_loadable_model_per_candidate(tmp_path: Path, single_coef_1: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sweep"
    code, output = run_cli("extrapolate", RUN, "--coef", "0.5,1,2", "--method", "power", "--out", out)
    assert code == 0, output
    labels = ["coef_0.5", "coef_1", "coef_2"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == labels
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["kind"] == "full-parameter" and manifest["extrapolation"]["method"] == "power"
    assert [(c["label"], c["coef"], c["adapter"]) for c in manifest["candidates"]] == [(x, float(x[5:]), x) for x in labels]
    # the coefficient-1 model of the sweep is the single-target run's, byte for byte
    assert (out / "coef_1" / WEIGHTS).read_bytes() == (single_coef_1 / WEIGHTS).read_bytes()
    latest = load_file(RUN / "checkpoint-80" / WEIGHTS)
    for label in labels:
        own = json.loads((out / label / "nextoffline.json").read_text())
        assert own["selected"]["label"] == label
        model = AutoModelForCausalLM.from_pretrained(out / label)
        got = load_file(out / label / WEIGHTS)
        torch.testing.assert_close(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
        truth = law_weights(load_file(BASE / WEIGHTS), own["selected"]["step"])
        for key in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):  # the sqrt law at each candidate's step
            assert float((got[key] - truth[key]).norm()) < 1e-3 * float((latest[key] - truth[key]).norm())
    assert "coef_2" in output and "step 140" in output


def test_sweep_reads_each_slab_once_whatever_the_number_of_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nextoffline.dense.pipeline as dense_pipeline
    from nextoffline.dense import load_dense_trajectory, run_dense_extrapolate

    trajectory = load_dense_trajectory(RUN)
    counts = {"reads": 0}
    for name in ("read_into", "read_slab"):
        original = getattr(dense_pipeline, name)

        def counted(*args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dense_pipeline, name, counted)
    seen = []
    for coefs in ([1.0], [0.0, 0.5, 1.0, 2.0]):
        counts["reads"] = 0
        run_dense_extrapolate(
            trajectory, device=torch.device("cpu"), chunk_bytes=1 << 26, out_dir=tmp_path / str(len(coefs)), method="power", coefs=coefs
        )
        seen.append(counts["reads"])
    assert seen[0] == seen[1] > 0


def test_to_step_sweep_names_folders_by_step(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    code, output = run_cli("extrapolate", RUN, "--to-step", "100,120", "--method", "linear", "--out", out)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["step_100", "step_120"]


EVAL_SCRIPT = """
import sys
import numpy as np
from safetensors.numpy import load_file
got = load_file(sys.argv[1] + "/model.safetensors")
truth = np.load(sys.argv[2])
print("distance:", sum(float(np.square(got[k].astype(np.float64) - truth[k]).sum()) for k in truth.files))
"""


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An evaluator reading the weights: distance to the known law's weights at step 120 (lower is better)."""
    folder = tmp_path_factory.mktemp("eval")
    truth = law_weights(load_file(BASE / WEIGHTS), 120)
    np.savez(folder / "truth.npz", **{k: v.double().numpy() for k, v in truth.items()})
    (folder / "score.py").write_text(EVAL_SCRIPT)
    return f"{sys.executable} {folder / 'score.py'} {{adapter}} {folder / 'truth.npz'}"


def test_eval_cmd_selects_the_candidate_the_command_scores_best(tmp_path: Path, evaluator: str) -> None:
    out = tmp_path / "out"
    args = ["extrapolate", RUN, "--to-step", "100,120,160", "--method", "power", "--out", out, "--eval-cmd", evaluator]
    code, output = run_cli(*args, "--eval-lower-is-better", "--keep-all", "--resumable")
    assert code == 0, output
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["selected"]["label"] == "step_120" and manifest["lower_is_better"] is True
    scores = {c["label"]: c["score"] for c in manifest["candidates"]}
    assert set(scores) == {"coef_0", "step_100", "step_120", "step_160"}
    assert min(scores, key=scores.__getitem__) == "step_120" and scores["step_120"] < 1e-3 * scores["coef_0"]
    assert "selected step_120" in manifest["extrapolation"]["note"]
    # OUT is the selected model; the others are kept under candidates/ with their own manifest; every log is kept
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["coef_0", "step_100", "step_160"]
    assert (out / "candidates" / "coef_0" / WEIGHTS).read_bytes() == (RUN / "checkpoint-80" / WEIGHTS).read_bytes()
    kept = json.loads((out / "candidates" / "step_160" / "nextoffline.json").read_text())
    assert kept["selected"]["selected"] is False and "not selected" in kept["selected"]["note"]
    assert sorted(p.name for p in (out / "eval_logs").iterdir()) == [f"{x}.log" for x in sorted(scores)]
    # --resumable: the trainer's checkpoint carries the selected candidate's weights
    assert (out / "resume" / "checkpoint-80" / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_eval_cmd_keeps_the_latest_when_it_scores_best(tmp_path: Path) -> None:
    """Coefficient 0 is always scored and wins ties: an evaluator that cannot tell them apart keeps the latest."""
    out = tmp_path / "out"
    code, output = run_cli(
        "extrapolate", RUN, "--coef", "1,2", "--method", "power", "--out", out, "--eval-cmd", "test -d {adapter} && echo 1", "--resumable"
    )
    assert code == 0, output
    assert (out / WEIGHTS).read_bytes() == (RUN / "checkpoint-80" / WEIGHTS).read_bytes()
    assert not (out / "candidates").exists()
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["selected"]["label"] == "coef_0" and "latest checkpoint" in manifest["extrapolation"]["note"]
    assert (out / "resume" / "checkpoint-80" / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()


def test_eval_failure_leaves_no_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = run_cli(
        "extrapolate", RUN, "--coef", "1", "--method", "power", "--out", out, "--eval-cmd", "test -d {adapter} && echo oops"
    )
    assert code != 0 and "printed no number" in output and "Traceback" not in output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_max_step_drops_later_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = run_cli("extrapolate", RUN, "--max-step", 60, "--to-step", 80, "--method", "power", "--out", out)
    assert code == 0, output
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["source"]["steps"] == [10, 20, 30, 40, 50, 60]
    got, real = load_file(out / WEIGHTS), load_file(RUN / "checkpoint-80" / WEIGHTS)
    torch.testing.assert_close(got, real, rtol=0, atol=1e-4)  # the held-back checkpoint, predicted by the sqrt law
    code, output = run_cli("extrapolate", RUN, "--max-step", 20, "--coef", 1, "--method", "power", "--out", tmp_path / "o2")
    assert code != 0 and "up to --max-step 20" in output


def test_refusals_name_the_option(tmp_path: Path) -> None:
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--rank-policy", "grow", "--out", tmp_path / "o")
    assert code != 0 and "--rank-policy" in output
    code, output = run_cli("extrapolate", RUN, "--coef", "1,2", "--resumable", "--out", tmp_path / "o")
    assert code != 0 and "--resumable needs one target" in output
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--keep-all", "--out", tmp_path / "o")
    assert code != 0 and "--keep-all only applies with --eval-cmd" in output
    assert not (tmp_path / "o").exists()


def test_report_on_a_full_parameter_run_and_its_sweep(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sweep = tmp_path / "sweep"
    code, output = run_cli("extrapolate", RUN, "--coef", "1,2", "--method", "power", "--out", sweep)
    assert code == 0, output
    out = tmp_path / "report"
    args = [
        "report",
        RUN,
        "--out",
        out,
        "--extrapolation",
        sweep,
        "--methods",
        "linear,power",
        "--backtest-methods",
        "power,linear",
        "--max-modules",
        3,
    ]
    code, output = run_cli(*args, "--to-step", 160)
    assert code == 0, output
    data = json.loads((out / "report.json").read_text())
    assert data["inspect"]["kind"] == "full-parameter" and len(data["all_modules"]) == 21
    assert data["backtest"]["best"] == "power" and data["backtest"]["errors"]["power"] < 0.01
    # the sqrt law: c(t) is proportional to sqrt(t / 10) - 1 (deltas against step 10), the power curve follows it
    expected = (math.sqrt(16) - 1) / (math.sqrt(8) - 1)
    for module in data["modules"]:
        assert module["grid"][-1] == 160 and module["explained"] > 0.999
        assert module["predictions"]["power"][-1] / module["coefficients"][-1] == pytest.approx(expected, rel=1e-3)
    assert [(c["label"], c["adapter"]) for c in data["extrapolation"]["candidates"]] == [("coef_1", "coef_1"), ("coef_2", "coef_2")]
    markdown = (out / "report.md").read_text()
    assert "full-parameter: 21 tensors" in markdown and "| `power` |" in markdown and "`coef_2`" in markdown
    assert all((out / name).is_file() for name in ("energy.png", "coefficients.png", "backtest.png"))


# ------------------------------------------------------------------------------ NExt on dense deltas


def test_triplet_series_matches_svd_of_global_local_and_target_deltas() -> None:
    from nextoffline.ops.dense import TripletSeries

    gen = torch.Generator().manual_seed(0)
    k, h = 6, 2
    deltas = torch.randn(k, 2, 20, 12, generator=gen).cumsum(0)
    series = TripletSeries(h)
    for t in range(k):
        series.add(deltas[t])
    features = series.features()
    assert features.local[0] is None and all(f is None for f in features.target[k - h :])

    def check(triplet, matrix) -> None:
        u, s, vh = torch.linalg.svd(matrix.double())
        torch.testing.assert_close(triplet.sigma.double(), s[:, 0], rtol=1e-4, atol=1e-5)
        assert bool(((triplet.u.double() * u[:, :, 0]).sum(-1).abs() > 0.999).all())
        assert bool(((triplet.v.double() * vh[:, 0, :]).sum(-1).abs() > 0.999).all())

    for t in range(k):
        check(features.global_[t], deltas[t])
        if t:
            check(features.local[t], deltas[t] - deltas[t - 1])
        if t + h < k:
            check(features.target[t], deltas[t + h] - deltas[t])
    for seq in (features.global_, features.local[1:], features.target[: k - h]):  # signs aligned along the steps
        for before, after in itertools.pairwise(seq):
            assert bool(((before.u * after.u).sum(-1) + (before.v * after.v).sum(-1) > 0).all())


def write_rank1_run(root: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Step folders with ``W(t) = W_base + (t / 10) D``, ``D`` rank-1 for 2-D tensors (NExt's assumption)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    direction = {}
    for key, value in base.items():
        rms = float(value.square().mean().sqrt())
        if value.dim() == 2:
            d = torch.randn(value.shape[0], 1, generator=gen) @ torch.randn(1, value.shape[1], generator=gen)
        else:
            d = torch.randn(value.shape, generator=gen)
        direction[key] = d / d.square().mean().sqrt() * 0.05 * rms
    for step in range(10, 90, 10):
        model.load_state_dict({k: v + step / 10 * direction[k] for k, v in base.items()})
        model.save_pretrained(root / f"step_{step}")
    return root, base, direction


@pytest.fixture(scope="module")
def rank1_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return write_rank1_run(tmp_path_factory.mktemp("rank1") / "run")


FAST_NEXT = {"epochs": 60, "lr": 1e-2, "hidden": 16}


def test_next_extrapolates_a_rank1_law_better_than_stopping(tmp_path: Path, rank1_run) -> None:
    from nextoffline.dense import load_dense_trajectory, run_dense_extrapolate
    from nextoffline.ops.predictors import NextOptions

    run, base, direction = rank1_run
    out = tmp_path / "out"
    summary = run_dense_extrapolate(
        load_dense_trajectory(run), device=torch.device("cpu"), chunk_bytes=1 << 26, out_dir=out, method="next", to_steps=[120],
        next_options=NextOptions(**FAST_NEXT),
    )  # fmt: skip
    extrapolation = summary["extrapolation"]
    assert extrapolation["method"] == "next" and extrapolation["tensors"] == 16
    assert extrapolation["fallback_1d"] == 5 and extrapolation["fallback_over_budget"] == 0
    got, latest = load_file(out / WEIGHTS), load_file(run / "step_80" / WEIGHTS)
    matrices = [k for k in got if got[k].dim() == 2]
    num = sum(float((got[k] - (base[k] + 12 * direction[k])).square().sum()) for k in matrices)
    den = sum(float((latest[k] - (base[k] + 12 * direction[k])).square().sum()) for k in matrices)
    assert math.sqrt(num / den) < 0.9  # stopping = 1.0
    for key in matrices:  # the update NExt adds is rank-1
        assert int(torch.linalg.matrix_rank((got[key] - latest[key]).double(), rtol=1e-4)) <= 1


def test_next_backtest_error_is_exact(rank1_run) -> None:
    """The streamed bilinear forms give the same held-out error as the dense computation; auto's
    backtest scores NExt over the whole model (the fallback trend on the 1-D tensors)."""
    from nextoffline.dense import load_dense_trajectory
    from nextoffline.dense.dist import Group
    from nextoffline.dense.next import DenseNext, next_backtest_sums
    from nextoffline.dense.pipeline import collect_stats
    from nextoffline.dense.select import dense_backtest
    from nextoffline.ops.predictors import NextOptions

    run, _base, _direction = rank1_run
    trajectory = load_dense_trajectory(run)
    ctx = DenseNext(Group(), torch.device("cpu"), 1 << 26, NextOptions(epochs=10, lr=1e-2, hidden=8))  # exact for any fit
    stats = collect_stats(trajectory, ctx.device, ctx.budget, ctx.group, next_horizon=2)
    assert len(stats.features) == 16
    err, base_err, fit = next_backtest_sums(trajectory, stats, 2, 2, ctx)
    weights = {s: load_file(run / f"step_{s}" / WEIGHTS) for s in (10, 60, 70, 80)}
    for j, step in enumerate((70, 80)):
        c = fit.coefficient(step)
        expected = expected_base = 0.0
        for key, (sigma, u, v) in fit.triplets.items():
            truth = (weights[step][key] - weights[60][key]).double()
            expected += float((c * float(sigma) * torch.outer(u, v).double() - truth).square().sum())
            expected_base += float(truth.square().sum())
        assert float(err[j]) == pytest.approx(expected, rel=1e-4)
        assert float(base_err[j]) == pytest.approx(expected_base, rel=1e-6)
    result = dense_backtest(trajectory, stats, ["next", "linear"], holdout=2, next_ctx=ctx, horizon=2)
    assert math.isfinite(result.errors["next"]) and len(result.per_step["next"]) == 2 and result.errors["linear"] < 1e-3


def test_auto_backtests_next_only_within_the_next_budget(tmp_path: Path) -> None:
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--next-epochs", 3, "--out", tmp_path / "with", "--json")
    assert code == 0, output
    backtest = json.loads((tmp_path / "with" / "nextoffline.json").read_text())["backtest"]
    assert "next" in backtest["errors"] and backtest["best"] == "power"  # the sqrt law is full-rank: NExt's rank-1 update loses
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--next-budget", 0, "--out", tmp_path / "without")
    assert code == 0, output
    manifest = json.loads((tmp_path / "without" / "nextoffline.json").read_text())
    assert "next" not in manifest["backtest"]["errors"] and "auto skipped next" in manifest["extrapolation"]["note"]


def test_next_triplets_read_per_tensor_or_skipped_by_the_budget(rank1_run) -> None:
    """A 2-D tensor larger than one statistics slab gets its triplets from one more read (same
    values); one whose (h + 3) float32 deltas exceed the budget is skipped and counted."""
    from nextoffline.dense import load_dense_trajectory
    from nextoffline.dense.dist import Group
    from nextoffline.dense.pipeline import collect_stats

    trajectory = load_dense_trajectory(rank1_run[0])
    one_slab = collect_stats(trajectory, torch.device("cpu"), 1 << 26, Group(), next_horizon=2)
    per_tensor = collect_stats(trajectory, torch.device("cpu"), 100_000, Group(), next_horizon=2)  # < 9 rows of 1536 x 16 B
    tight = collect_stats(trajectory, torch.device("cpu"), 20_000, Group(), next_horizon=2)
    assert set(per_tensor.features) == set(one_slab.features) and len(one_slab.features) == 16
    for key, features in one_slab.features.items():
        for a, b in zip(features.global_, per_tensor.features[key].global_):
            torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-6, atol=0)
    big = {k for k, e in trajectory.latest.entries.items() if len(e.shape) == 2 and 5 * 4 * e.numel > 20_000}
    assert big and set(tight.next_skipped) == big and set(tight.features) == set(one_slab.features) - big
