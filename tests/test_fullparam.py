"""Full-parameter trajectories: dense math against torch.linalg, known-law extrapolation end to end,
HF model folder output (sharding, dtype, loading), refusals, and torchrun byte-identity."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nextoffline.cli import main
from nextoffline.ops.dense import accumulate_gram, align_signs, holdout_errors, top_triplet, trend_weights
from tests.conftest import FIXTURES, torchrun_cli, tree_hashes

sys.path.insert(0, str(FIXTURES))
from make_fullparam_fixture import law_weights

RUN = FIXTURES / "fullparam_sqrt"
#: `auto` on these tiny models would include NExt (projected within --next-budget); these tests are about the trends
NO_NEXT = ("--next-budget", 0)
BASE = FIXTURES / "tiny_base"


def run_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"], catch_exceptions=False)
    return result.exit_code, result.output


def relative_to_stopping(out: dict[str, torch.Tensor], latest: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    num = sum(float((out[k].double() - truth[k].double()).square().sum()) for k in truth)
    den = sum(float((latest[k].double() - truth[k].double()).square().sum()) for k in truth)
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("shape", [(3, 40, 25), (2, 7, 60), (4, 1, 9)])
def test_top_triplet_matches_svd(shape: tuple[int, int, int]) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    x[:, :, :] += 3 * torch.randn(shape[0], shape[1], 1, dtype=torch.float64) * torch.randn(shape[0], 1, shape[2], dtype=torch.float64)
    got = align_signs(top_triplet(x, tol=1e-12))
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    ref = align_signs(type(got)(sigma=s[:, 0], u=u[:, :, 0], v=vh[:, 0, :], iterations=0))
    torch.testing.assert_close(got.sigma, ref.sigma, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.u, ref.u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.v, ref.v, rtol=1e-6, atol=1e-6)


def test_top_triplet_warm_start_converges_faster_and_aligns_to_reference() -> None:
    x = torch.randn(2, 80, 50, dtype=torch.float64)
    cold = align_signs(top_triplet(x, tol=1e-10, block=1))
    warm = top_triplet(x + 1e-4 * torch.randn_like(x), init=cold.v, tol=1e-10, block=1)
    assert warm.iterations < cold.iterations
    flipped = align_signs(type(warm)(warm.sigma, -warm.u, -warm.v, 0), reference_u=cold.u)
    assert bool(((flipped.u * cold.u).sum(-1) > 0.99).all())


def test_gram_and_holdout_errors_match_dense_computation() -> None:
    deltas = torch.randn(6, 1000, dtype=torch.float32)
    gram = torch.zeros(6, 6, dtype=torch.float64)
    for start in range(0, 1000, 300):  # slab by slab
        accumulate_gram(gram, deltas[:, start : start + 300])
    torch.testing.assert_close(gram, deltas.double() @ deltas.double().T)
    weights = torch.randn(1, 6, dtype=torch.float64)
    err, base = holdout_errors(gram.unsqueeze(0), weights, last=3, target=5)
    d = deltas.double()
    predicted = (weights[0].unsqueeze(-1) * d).sum(0)
    torch.testing.assert_close(err[0], (predicted - (d[5] - d[3])).square().sum())
    torch.testing.assert_close(base[0], (d[5] - d[3]).square().sum())


def test_trend_weights_reproduce_a_linear_trajectory_exactly() -> None:
    direction = torch.randn(500, dtype=torch.float64)
    steps = [10.0, 20.0, 30.0, 40.0, 50.0]
    deltas = torch.stack([(s - 10) * direction for s in steps])
    gram = (deltas @ deltas.T).unsqueeze(0)
    weights = trend_weights(gram, steps, range(5), regressor="linear", window=None, target_step=80.0)
    torch.testing.assert_close((weights[0].unsqueeze(-1) * deltas).sum(0), 30 * direction)


# ------------------------------------------------------------------------- known law, end to end


@pytest.mark.parametrize("with_base", [False, True])
def test_auto_extrapolates_the_known_law_and_output_loads(tmp_path: Path, with_base: bool) -> None:
    from transformers import AutoModelForCausalLM

    before = tree_hashes(RUN)
    out = tmp_path / "out"
    args = ["extrapolate", RUN, "--to-step", 120, "--out", out, "--device", "cpu", *NO_NEXT] + (["--base", BASE] if with_base else [])
    code, output = run_cli(*args)
    assert code == 0, output
    assert "auto selected power" in output
    truth = law_weights(load_file(BASE / "model.safetensors"), 120)
    latest = load_file(RUN / "checkpoint-80" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert relative_to_stopping(got, latest, truth) < 1e-3  # stopping = 1.0
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in latest.items()}
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (RUN / "checkpoint-80" / name).read_bytes()
    assert not (out / "optimizer.pt").exists()
    manifest = json.loads((out / "nextoffline.json").read_text())
    assert manifest["kind"] == "full-parameter" and manifest["extrapolation"]["method"] == "power"
    assert manifest["backtest"]["errors"]["power"] < 0.01
    assert tree_hashes(RUN) == before


def test_inspect_and_backtest_json(tmp_path: Path) -> None:
    code, output = run_cli("inspect", RUN, "--json", "--device", "cpu")
    assert code == 0, output
    report = json.loads(output)
    assert report["kind"] == "full-parameter" and report["format"] == "hf-trainer"
    assert report["steps"] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert report["trajectory_explained_variance"] > 0.999  # one direction per tensor by construction
    first, last = load_file(RUN / "checkpoint-10" / "model.safetensors"), load_file(RUN / "checkpoint-80" / "model.safetensors")
    deltas = [(last[k] - first[k]).double() for k in last if last[k].dim() == 2]
    expected = sum(float(torch.linalg.svdvals(d)[0] ** 2) for d in deltas) / sum(float(d.square().sum()) for d in deltas)
    assert report["rank1_tensors"] == len(deltas)
    assert report["per_step"][-1]["global_rank1_energy"] == pytest.approx(expected, rel=1e-4)
    code, output = run_cli("backtest", RUN, "--json", "--methods", "linear,power")
    assert code == 0, output
    result = json.loads(output)
    assert result["errors"]["power"] < 0.01 < result["errors"]["linear"] < 1.0


def test_resumable_replaces_weights_and_keeps_trainer_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--out", out, "--resumable", *NO_NEXT)
    assert code == 0, output
    resume = out / "resume" / "checkpoint-80"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        assert (resume / name).read_bytes() == (RUN / "checkpoint-80" / name).read_bytes()
    assert (resume / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert f"resume_from_checkpoint='{out}/resume/checkpoint-80'" in output


# ---------------------------------------------------------- sharded bf16 runs built at test time


def write_model_run(root: Path, *, law: str, dtype: torch.dtype, shard: str | None, steps=range(10, 90, 10), seed: int = 0) -> Path:
    """Step folders of save_pretrained models: ``W = W_base + f(t) D`` (``sqrt``) or a random walk (``noise``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(v.shape, generator=gen) * 0.05 * float(v.float().square().mean().sqrt()) for k, v in base.items()}
    walk = {k: torch.zeros_like(v) for k, v in base.items()}
    for step in steps:
        values = {}
        for key, value in base.items():
            if law == "sqrt":
                values[key] = value + math.sqrt(step / 10) * direction[key]
            else:
                walk[key] += torch.randn(value.shape, generator=gen) * 0.05 * float(value.float().square().mean().sqrt())
                values[key] = value + walk[key]
        model.load_state_dict(values)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.to(dtype).save_pretrained(root / f"step_{step}", **kwargs)
        model.to(torch.float32)
    return root


@pytest.fixture(scope="module")
def sharded_bf16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_run(tmp_path_factory.mktemp("bf16") / "run", law="sqrt", dtype=torch.bfloat16, shard="10KB")


def test_sharded_bf16_output_keeps_sharding_and_dtype(tmp_path: Path, sharded_bf16_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    latest = sharded_bf16_run / "step_80"
    shards = sorted(p.name for p in latest.glob("model-*.safetensors"))
    assert len(shards) > 1
    out = tmp_path / "out"
    code, output = run_cli("extrapolate", sharded_bf16_run, "--coef", 1, "--out", out, "--chunk-mb", 1, *NO_NEXT)
    assert code == 0, output
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_bytes() == (latest / "model.safetensors.index.json").read_bytes()
    for name in shards:
        got, src = load_file(out / name), load_file(latest / name)
        assert list(got) == list(src) and all(got[k].dtype == torch.bfloat16 for k in got)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_coef_zero_returns_the_latest_bytes(tmp_path: Path, sharded_bf16_run: Path) -> None:
    out = tmp_path / "out"
    code, output = run_cli("extrapolate", sharded_bf16_run, "--coef", 0, "--method", "linear", "--out", out)
    assert code == 0, output
    for shard in (sharded_bf16_run / "step_80").glob("model*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_auto_keeps_latest_weights_when_nothing_beats_stopping(tmp_path: Path) -> None:
    run = write_model_run(tmp_path / "noise", law="noise", dtype=torch.float32, shard=None, seed=3)
    out = tmp_path / "out"
    code, output = run_cli("extrapolate", run, "--coef", 1, "--out", out, *NO_NEXT)
    assert code == 0, output
    assert "latest weights are kept unchanged" in output
    assert (out / "model.safetensors").read_bytes() == (run / "step_80" / "model.safetensors").read_bytes()
    assert json.loads((out / "nextoffline.json").read_text())["extrapolation"]["method"] == "none"


def test_bf16_resolution_warning_is_measured(tmp_path: Path) -> None:
    run = tmp_path / "tiny_updates"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE)
    for step in range(10, 60, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-6 * torch.randn_like(p))  # far below bf16 resolution of O(0.02) weights
        model.to(torch.bfloat16).save_pretrained(run / f"step_{step}")
        model.to(torch.float32)
    code, output = run_cli("inspect", run, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["warning"] and "bf16" in report["warning"]
    assert report["per_step"][1]["unchanged_16bit_fraction"] > 0.9


# ------------------------------------------------------------------------------------ refusals


def test_resumable_refused_for_plain_step_folders(tmp_path: Path, sharded_bf16_run: Path) -> None:
    code, output = run_cli("extrapolate", sharded_bf16_run, "--coef", 1, "--out", tmp_path / "o", "--resumable")
    assert code != 0 and "needs HF Trainer checkpoint-N" in output
    assert not (tmp_path / "o").exists()


def test_resumable_refused_when_deepspeed_state_may_hold_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    (run / "checkpoint-80" / "global_step80").mkdir()  # DeepSpeed keeps weights (and fp32 masters) here
    code, output = run_cli("extrapolate", run, "--coef", 1, "--out", tmp_path / "o", "--resumable")
    assert code != 0 and "global_step80" in output and "DeepSpeed" in output
    assert not (tmp_path / "o").exists()


def test_resumable_refused_when_a_weight_file_would_be_copied_unchanged(tmp_path: Path) -> None:
    """accelerate FSDP keeps the model in pytorch_model_fsdp.bin next to the safetensors: copying it
    unchanged would resume the OLD weights, so the no-silent-loss rule refuses and names it."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    torch.save({"w": torch.zeros(2)}, run / "checkpoint-80" / "pytorch_model_fsdp.bin")
    code, output = run_cli("extrapolate", run, "--coef", 1, "--out", tmp_path / "o", "--resumable")
    assert code != 0 and "pytorch_model_fsdp.bin" in output and "FSDP" in output and "Traceback" not in output
    assert not (tmp_path / "o").exists()


def test_bin_weights_and_next_are_clear_errors(tmp_path: Path) -> None:
    run = tmp_path / "bin_run"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        torch.save({"w": torch.zeros(2)}, run / f"checkpoint-{step}" / "pytorch_model.bin")
    code, output = run_cli("inspect", run)
    assert code != 0 and "safe_serialization=True" in output and "Traceback" not in output
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--method", "lawa", "--out", tmp_path / "o")
    assert code != 0 and "LoRA-only" in output


# ------------------------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_write_byte_identical_weights(tmp_path: Path, sharded_bf16_run: Path) -> None:
    """Two targets scored by --eval-cmd (rank 0 evaluates) with --keep-all: every candidate's files
    are byte-identical to the single-process run's."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["extrapolate", str(sharded_bf16_run), "--coef", "1.5,3", "--device", "cpu", "--chunk-mb", "1", *map(str, NO_NEXT)]
    args += ["--eval-cmd", "test -f {adapter}/config.json && echo $NEXTOFFLINE_COEF", "--keep-all", "--quiet"]
    code, output = run_cli(*args[:-1], "--out", single)
    assert code == 0, output
    proc = torchrun_cli([*args, "--out", str(multi)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folders = [Path("."), Path("candidates/coef_0"), Path("candidates/coef_1.5")]  # coef_3 scores best: OUT itself
    assert json.loads((single / "nextoffline.json").read_text())["selected"]["label"] == "coef_3"
    for folder in folders:
        weight_files = sorted(p.name for p in (single / folder).glob("model*.safetensors*"))
        assert len(weight_files) > 2
        for name in weight_files:
            assert (multi / folder / name).read_bytes() == (single / folder / name).read_bytes(), folder / name
    manifest = json.loads((multi / "nextoffline.json").read_text())
    assert manifest["processes"] == 2 and manifest["selected"]["label"] == "coef_3"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    shutil.rmtree(multi)


def test_trainer_resumes_from_the_resumable_checkpoint_with_extrapolated_weights(tmp_path: Path) -> None:
    """``Trainer.train(resume_from_checkpoint=...)`` loads the replaced weights and the copied trainer state."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    out = tmp_path / "out"
    code, output = run_cli("extrapolate", RUN, "--coef", 1, "--out", out, "--resumable", *NO_NEXT)
    assert code == 0, output
    expected = load_file(out / "model.safetensors")
    seen: dict[str, object] = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["step"] = state.global_step

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.setdefault("weights", {k: v.detach().clone() for k, v in model.state_dict().items()})
            seen.setdefault("resumed_at", state.global_step)

    ids = torch.randint(4, 17, (64, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "resumed"), max_steps=81, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(BASE), args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    trainer.add_callback(Probe())
    trainer.train(resume_from_checkpoint=str(out / "resume" / "checkpoint-80"))
    assert seen["resumed_at"] == 80
    for key, value in expected.items():
        torch.testing.assert_close(seen["weights"][key], value, rtol=0, atol=0)
