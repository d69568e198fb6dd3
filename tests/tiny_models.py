"""Tiny models, tokenizers and a real TRL GRPO + LoRA run, built locally (no network).

Used by the test suite, ``fixtures/make_trl_grpo_fixture.py`` and the examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:  # the trainer helpers need transformers; the module stays importable without it
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover
    _CallbackBase = object

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", " ", "+", "=", *list("0123456789")]
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_tokenizer(path: Path | None = None):
    """A character-level fast tokenizer over digits, '+', '=' and space (``decode`` concatenates the characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.padding_side = "left"
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_causal_lm(tokenizer, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, intermediate_size: int = 48):
    """A randomly initialised Llama (fp32), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_base(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny base model and its tokenizer with ``save_pretrained`` (safetensors)."""
    tokenizer = build_tiny_tokenizer(path)
    build_tiny_causal_lm(tokenizer, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def addition_prompts(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Prompts ``"a+b="`` with the answer, for a verifiable reward."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def addition_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """1 for the exact sum, 0.2 per correct leading character, 0.05 per digit (a dense signal)."""
    rewards = []
    for completion, truth in zip(completions, answer):
        text = completion.strip().replace(" ", "")
        shaped = sum(0.2 for c, t in zip(text, truth) if c == t) + 0.05 * sum(c.isdigit() for c in completion)
        rewards.append((1.0 if text[: len(truth)] == truth else 0.0) + shaped)
    return rewards


def run_tiny_grpo(
    output_dir: Path,
    *,
    base_dir: Path,
    max_steps: int,
    save_steps: int = 1,
    seed: int = 0,
    resume_from_checkpoint: str | None = None,
    lora_r: int = 4,
    lora_alpha: int = 8,
    learning_rate: float = 2e-2,
    target_modules: Sequence[str] = TARGET_MODULES,
    callbacks: Sequence[Any] = (),
    num_threads: int | None = 1,
):
    """TRL ``GRPOTrainer`` + PEFT LoRA on the tiny base, on CPU; returns the trainer after training.

    One prompt per optimizer step with 8 sampled completions of at most 3 tokens (``num_generations=8``,
    ``per_device_train_batch_size=8``, so ``steps_per_generation=1`` and ``generation_batch_size=8``),
    ``beta=0`` (no reference model), AdamW at a constant ``learning_rate`` (large, so LoRA B leaves
    zero visibly at step 1), fp32, no vLLM. Every ``save_steps`` steps TRL writes a full
    ``checkpoint-N/`` (``save_only_model=False``). Runs are deterministic for a given ``seed``, and
    ``resume_from_checkpoint`` continues a run bit for bit (see ``tests/test_tiny_trl.py``).
    ``num_threads``: torch intra-op threads during the run (restored afterwards); one thread is the
    fastest for these tiny matrices and 5-10x faster than two when other processes share the CPU.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        save_strategy="steps",
        save_only_model=False,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=3,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        beta=0.0,
        temperature=1.0,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_total_limit=None,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=config,
        train_dataset=Dataset.from_list(addition_prompts(64, seed=seed)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(target_modules), task_type="CAUSAL_LM"
        ),
    )
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        torch.set_num_threads(threads)
    return trainer


class AdapterSnapshot(_CallbackBase):
    """A ``TrainerCallback`` recording the LoRA weights (and optimizer state) when training (re)starts.

    ``at_train_begin``: ``get_peft_model_state_dict(model)`` in ``on_train_begin``, which ``Trainer``
    calls after ``_load_from_checkpoint`` and ``_load_optimizer_and_scheduler``. ``at_first_step``: the
    same in the first ``on_step_begin``, immediately before the first optimizer step of the run, with
    ``optimizer.state_dict()``. Tensors are cloned; keys are PEFT's saved keys (no adapter name).
    """

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.first_step: int | None = None
        self.at_train_begin: dict[str, torch.Tensor] = {}
        self.at_first_step: dict[str, torch.Tensor] = {}
        self.optimizer_at_first_step: dict[str, Any] = {}

    @staticmethod
    def _lora(model) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.start_step = state.global_step
        self.at_train_begin = self._lora(model)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        if self.first_step is None:
            self.first_step = state.global_step
            self.at_first_step = self._lora(model)
            if optimizer is not None:
                import copy

                self.optimizer_at_first_step = copy.deepcopy(optimizer.state_dict())
