"""The TRL fixture is exactly what TRL 1.x + PEFT write, and plain TRL resumes from it.

``fixtures/trl_grpo_tiny`` (= ``nextoffline/data/example_grpo``) and ``fixtures/tiny_base`` are made
by ``fixtures/make_trl_grpo_fixture.py`` with ``tests/tiny_models.py``. The resume tests run a real
``GRPOTrainer`` on CPU (a few seconds each) and pin down what ``Trainer`` reads on resume, which is
what ``nextoffline extrapolate --resumable`` must get right.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import FIXTURES, tree_hashes
from tests.tiny_models import TARGET_MODULES, AdapterSnapshot, run_tiny_grpo

pytest.importorskip("trl")
pytest.importorskip("peft")

RUN = FIXTURES / "trl_grpo_tiny"
BASE = FIXTURES / "tiny_base"
STEPS = list(range(1, 9))
# Every file TRL 1.16 / transformers 5.24 / PEFT 0.21 writes per checkpoint (GRPOTrainer._save_checkpoint
# writes README.md, Trainer.save_model the adapter and the tokenizer, then optimizer/scheduler/RNG/state).
CHECKPOINT_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "training_args.bin",
}
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def adapter(step: int, run: Path = RUN) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")


def expected_shapes() -> dict[str, tuple[int, int]]:
    """PEFT key -> shape, from the base model's config: A is (r, in_features), B is (out_features, r)."""
    config = json.loads((BASE / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    in_out = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    r = 4
    shapes = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, (n_in, n_out) in in_out.items():
            block = "self_attn" if proj in ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            shapes[f"{prefix}.lora_A.weight"] = (r, n_in)
            shapes[f"{prefix}.lora_B.weight"] = (n_out, r)
    return shapes


def test_fixture_is_a_trl_run_folder() -> None:
    assert sorted(p.name for p in RUN.iterdir()) == ["README.md", *(f"checkpoint-{s}" for s in STEPS)]
    for step in STEPS:
        ckpt = RUN / f"checkpoint-{step}"
        assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES, ckpt
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["max_steps"] == 8 and state["save_steps"] == 1
        assert [h["step"] for h in state["log_history"]] == list(range(1, step + 1))  # logging_steps=1
        assert torch.load(ckpt / "scheduler.pt", weights_only=True)["last_epoch"] == step
        assert set(torch.load(ckpt / "rng_state.pth", weights_only=False)) == {"python", "numpy", "cpu"}  # numpy state: not weights-only
        config = json.loads((ckpt / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
        assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)  # PEFT writes a set: order varies per run
        assert not config["use_rslora"] and not config["fan_in_fan_out"] and config["rank_pattern"] == {}
        # Relative to the repository root: the generator runs there so that no machine path is recorded.
        assert config["base_model_name_or_path"] == "fixtures/tiny_base"
    args = torch.load(RUN / "checkpoint-8" / "training_args.bin", weights_only=False)  # a pickled GRPOConfig
    assert type(args).__name__ == "GRPOConfig" and args.save_steps == 1 and args.learning_rate == 2e-2
    assert (args.num_generations, args.steps_per_generation, args.beta, args.use_vllm) == (8, 1, 0.0, False)


def test_fixture_adapter_keys_dtype_and_shapes() -> None:
    shapes = expected_shapes()
    for step in STEPS:
        path = RUN / f"checkpoint-{step}" / "adapter_model.safetensors"
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
        weights = load_file(path)
        assert {k: tuple(v.shape) for k, v in weights.items()} == shapes  # no adapter name ("default") in the keys
        assert {v.dtype for v in weights.values()} == {torch.float32}


def test_fixture_lora_moves_every_step() -> None:
    trajectory = [adapter(s) for s in STEPS]
    assert all(v.abs().sum() > 0 for k, v in trajectory[0].items() if ".lora_B." in k)  # B leaves zero at step 1
    for before, after in itertools.pairwise(trajectory):
        for key in before:  # every factor of every module moves at every step from step 1 to 8
            assert not torch.equal(before[key], after[key]), key


def test_fixture_loads_with_peft_offline() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    ids = tokenizer("3+4=", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "3+4=" and ids.shape == (1, 4)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (RUN / "checkpoint-8" / "tokenizer.json").read_bytes() == (BASE / "tokenizer.json").read_bytes()

    base = AutoModelForCausalLM.from_pretrained(BASE)
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, RUN / "checkpoint-8", is_trainable=True)
    file = adapter(8)
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == file.keys() and all(torch.equal(loaded[k], file[k]) for k in file)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_logits)
    # optimizer.pt is indexed 0..27 in named_parameters order (layer, then q,k,v,o,gate,up,down, A before B),
    # not in the (sorted) safetensors order.
    order = [name for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.load(RUN / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in optimizer["param_groups"]] == [28, 0]
    assert [tuple(optimizer["state"][i]["exp_avg"].shape) for i in range(len(order))] == [
        tuple(file[n.replace(".default", "")].shape) for n in order
    ]
    assert order[:2] == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
    ]


def test_trl_resume_from_fixture(tmp_path: Path) -> None:
    """Plain TRL resumes from checkpoint-8 with exactly its adapter and optimizer state, bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    before = tree_hashes(run)
    snapshot = AdapterSnapshot()
    trainer = run_tiny_grpo(
        run, base_dir=BASE, max_steps=10, save_steps=1, resume_from_checkpoint=str(run / "checkpoint-8"), callbacks=[snapshot]
    )

    assert snapshot.start_step == 8 and snapshot.first_step == 8 and trainer.state.global_step == 10
    saved = adapter(8)
    for weights in (snapshot.at_train_begin, snapshot.at_first_step):
        assert weights.keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    optimizer = torch.load(run / "checkpoint-8" / "optimizer.pt", weights_only=True)
    resumed = snapshot.optimizer_at_first_step["state"]
    assert resumed.keys() == optimizer["state"].keys()
    for index, moments in optimizer["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(resumed[index][name], moments[name], rtol=0, atol=0)

    for step in (9, 10):
        state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["global_step"] == step and [h["step"] for h in state["log_history"]] == list(range(1, step + 1))
    after = tree_hashes(run)
    assert {k: after[k] for k in before if k != "README.md"} == {k: v for k, v in before.items() if k != "README.md"}
    # (TRL rewrites the run's own README.md model card at every save; checkpoints 1..8 stay as they were.)


def test_trl_resumed_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Optimizer, scheduler, RNG and data order are all restored on resume: both runs are made HERE.

    (Comparing with the fixture's checkpoints bit for bit would test another CPU's float rounding.)
    """
    from peft import get_peft_model_state_dict

    straight = run_tiny_grpo(tmp_path / "straight", base_dir=BASE, max_steps=10, save_steps=8)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-8", resumed_dir / "checkpoint-8")
    resumed = run_tiny_grpo(
        resumed_dir, base_dir=BASE, max_steps=10, save_steps=8, resume_from_checkpoint=str(resumed_dir / "checkpoint-8")
    )
    assert resumed.state.global_step == 10
    final, again = get_peft_model_state_dict(straight.model), get_peft_model_state_dict(resumed.model)
    assert final.keys() == again.keys()
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "rename, honoured",
    [
        (lambda key: key.replace(".weight", ".default.weight"), True),  # adapter name in the key: PEFT strips it
        (lambda key: key.removeprefix("base_model.model."), False),  # foreign prefix: silently ignored
    ],
    ids=["adapter-name-in-keys", "foreign-prefix"],
)
def test_trl_resume_reads_only_the_adapter_keys_it_knows(tmp_path: Path, rename, honoured: bool) -> None:
    """Trainer._load_from_checkpoint -> PeftModel.load_adapter loads with strict=False and never checks
    the result: a checkpoint whose keys do not match resumes at step 8 from the FRESH LoRA init (B = 0)
    with no error and no warning. A --resumable writer must therefore keep PEFT's key names exactly."""
    checkpoint = tmp_path / "checkpoint-8"
    shutil.copytree(RUN / "checkpoint-8", checkpoint)
    saved = adapter(8)
    save_file({rename(k): v for k, v in saved.items()}, checkpoint / "adapter_model.safetensors", metadata={"format": "pt"})
    snapshot = AdapterSnapshot()
    run_tiny_grpo(
        tmp_path / "out", base_dir=BASE, max_steps=9, save_steps=100, resume_from_checkpoint=str(checkpoint), callbacks=[snapshot]
    )
    assert snapshot.start_step == 8
    matches = all(torch.equal(snapshot.at_first_step[k], v) for k, v in saved.items())
    assert matches is honoured
    if not honoured:
        assert all(not v.any() for k, v in snapshot.at_first_step.items() if ".lora_B." in k)
