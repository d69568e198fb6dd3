"""Shared pieces of the tiny GRPO example: tokenizer, model, data, SFT warm-up, evaluation.

Everything is small enough for a CPU: a character-level tokenizer (digits, ``+``, ``=``), a
2-layer Llama with hidden size 64, and 2-digit addition prompts such as ``"27+58="`` whose
answer is ``"85"`` followed by the end-of-sequence token.
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

import torch

DIGITS = "0123456789"
VOCAB = ["<pad>", "<eos>", "<unk>", *DIGITS, "+", "="]
HELD_OUT_SEED = 12345
TEST_SIZE = 500  # final comparison: never used to choose anything
VAL_SIZE = 300  # choosing: when the SFT warm-up stops, which extrapolation candidate is kept


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :data:`VOCAB` (no network access)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(tokenizer, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


@functools.lru_cache(maxsize=1)
def _held_out_pool() -> tuple[tuple[str, str], ...]:
    """TEST_SIZE + VAL_SIZE distinct problems fixed by a seed; no training prompt is one of them."""
    rng = random.Random(HELD_OUT_SEED)
    seen, out = set(), []
    while len(out) < TEST_SIZE + VAL_SIZE:
        prompt, answer = problem(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return tuple(out)


def eval_set(size: int | None = None, split: str = "test") -> list[tuple[str, str]]:
    """The fixed held-out ``test`` (final comparison) or ``val`` (selection) problems."""
    if split not in ("test", "val"):
        raise ValueError(f"split {split!r}: use test or val")
    pool = _held_out_pool()
    items = pool[:TEST_SIZE] if split == "test" else pool[TEST_SIZE:]
    return list(items[: size or len(items)])


def _held_out_prompts() -> set[str]:
    return {p for p, _ in _held_out_pool()}


def train_prompts(count: int, seed: int) -> list[dict[str, str]]:
    """GRPO prompts, never one of the held-out problems."""
    held_out = _held_out_prompts()
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        prompt, answer = problem(rng)
        if prompt not in held_out:
            rows.append({"prompt": prompt, "answer": answer})
    return rows


def sft_until(
    model, tokenizer, *, target: float, max_steps: int, check_every: int = 50, batch: int = 128, lr: float = 3e-3, seed: int = 1, log=print
) -> tuple[int, float]:
    """Supervised warm-up on ``"a+b=" -> "c<eos>"`` (loss on the answer only, full fine-tune) until the
    held-out accuracy reaches ``target``: a model that is right part of the time, so RL has work to do.

    Returns ``(steps, accuracy)``.
    """
    held_out = _held_out_prompts()
    problems = eval_set(split="val")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    started = time.time()
    acc = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        rows = []
        while len(rows) < batch:
            prompt, answer = problem(rng)
            if prompt not in held_out:
                rows.append((prompt, answer))
        ids, labels = _sft_batch(tokenizer, rows)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % check_every == 0:
            acc = accuracy(model, tokenizer, problems)
            log(f"  sft step {step}: loss {loss.item():.3f}, validation accuracy {acc:.3f} ({time.time() - started:.0f}s)")
            if acc >= target:
                return step, acc
    model.eval()
    return max_steps, acc


def _sft_batch(tokenizer, rows):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    seqs, masks = [], []
    for prompt, answer in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    labels = torch.full((len(seqs), width), -100)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.where(torch.tensor(m) == 1, torch.tensor(s), torch.tensor(-100))
    return ids, labels


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[tuple[str, str]], batch: int = 300) -> float:
    """Exact-match accuracy of greedy answers."""
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(text.strip() == answer for text, (_, answer) in zip(texts, chunk))
    return correct / len(problems)


def reward_exact(completions, answer, **_kwargs) -> list[float]:
    """GRPO reward: 1 for the exact sum, else the fraction of correct leading digits (a little shaping)."""
    rewards = []
    for completion, target in zip(completions, answer):
        text = completion.strip()
        if text == target:
            rewards.append(1.0)
            continue
        match = sum(1 for x, y in zip(text, target) if x == y)
        rewards.append(0.5 * match / max(len(target), len(text), 1))
    return rewards


def load_with_adapter(base: Path, adapter: Path | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
