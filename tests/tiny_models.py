"""Tiny models, tokenizers and a real TRL GRPO + LoRA run, built locally (no network).

Used by the test suite, ``fixtures/make_trl_grpo_fixture.py`` and the examples.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import torch

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", " ", "+", "=", *list("0123456789")]
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_tokenizer(path: Path | None = None):
    """A character-level fast tokenizer over digits, '+', '=' and space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
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
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
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
    callbacks: Sequence[Any] = (),
):
    """TRL GRPOTrainer + PEFT LoRA on the tiny base, on CPU; returns the trainer after training."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = GRPOConfig(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=save_steps, save_strategy="steps", save_only_model=False,
        per_device_train_batch_size=8, num_generations=8, max_completion_length=3, learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1, report_to=[], use_cpu=True, seed=seed, data_seed=seed, beta=0.0, temperature=1.0,
        bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True, save_total_limit=None,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=addition_reward, args=config, train_dataset=Dataset.from_list(addition_prompts(64, seed=seed)),
        processing_class=tokenizer, callbacks=list(callbacks),
        peft_config=LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM"),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer
