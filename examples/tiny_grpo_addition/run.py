"""Tiny end-to-end RLVR run on CPU: SFT warm-up -> TRL GRPO with LoRA -> nextoffline -> resume.

    python examples/tiny_grpo_addition/run.py            # full run: 3 seeds, ~5 minutes on 2 CPU cores
    python examples/tiny_grpo_addition/run.py --quick    # CI-sized run: 1 seed, ~1 minute

1. Build a 2-layer Llama with a character tokenizer and warm it up by SFT on 2-digit
   addition until it answers part of a fixed held-out set correctly (the "base model").
2. GRPO (TRL ``GRPOTrainer`` + LoRA) for T1 steps, saving ``checkpoint-N/`` every few steps.
3. ``nextoffline extrapolate`` on those checkpoints with a coefficient sweep scored by
   ``evaluate.py`` (held-out accuracy of base + adapter; coefficient 0 is always scored) and
   ``--resumable``: the best candidate is written as a TRL checkpoint under ``OUT/resume/``.
4. Continue GRPO to T_total steps twice, from the real ``checkpoint-T1`` (baseline) and
   from the extrapolated one. Everything else (optimizer state, RNG, data order) is identical.
5. Compare held-out accuracy and training reward at equal total steps; write
   ``results.json``, ``results.md`` and ``results.png`` in the work folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from addition import accuracy, build_model, build_tokenizer, eval_set, load_with_adapter, reward_exact, sft_until, train_prompts, write_json  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Mode:
    """Sizes of one run."""

    sft_target: float  # stop the SFT warm-up at this validation accuracy
    sft_max_steps: int
    t1: int  # GRPO steps before extrapolating
    t_total: int  # GRPO steps of both compared runs
    save_steps: int
    coefs: str  # nextoffline --coef sweep (0 is added as the reference)
    method: str
    val_size: int  # problems the evaluator scores candidates on (validation split)
    test_size: int  # problems of the final comparison (test split)
    prompts_per_step: int
    num_generations: int
    learning_rate: float
    lora_r: int
    seeds: tuple[int, ...]
    loop: tuple[str, ...]  # in-run ExtrapolationCallback variants, each a fresh GRPO run to t_total


FULL = Mode(
    sft_target=0.3,
    sft_max_steps=3000,
    t1=40,
    t_total=80,
    save_steps=5,
    coefs="0.5,1,2,4",
    method="linear",
    val_size=300,
    test_size=500,
    prompts_per_step=8,
    num_generations=8,
    learning_rate=2e-3,
    lora_r=8,
    seeds=(0, 1, 2),
    loop=("jump_once", "jump_once_rescale", "jump_once_reset", "jump_every", "jump_once_auto", "jump_once_eval"),
)
QUICK = Mode(
    sft_target=0.3,
    sft_max_steps=1500,
    t1=8,
    t_total=12,
    save_steps=2,
    coefs="1,2",
    method="linear",
    val_size=200,
    test_size=200,
    prompts_per_step=4,
    num_generations=8,
    learning_rate=2e-3,
    lora_r=8,
    seeds=(0,),
    loop=("jump_once",),
)


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------- GRPO


def make_trainer(base: Path, out_dir: Path, mode: Mode, max_steps: int, seed: int, callbacks=()):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=mode.prompts_per_step * mode.num_generations,
        num_generations=mode.num_generations,
        max_completion_length=4,
        temperature=1.0,
        learning_rate=mode.learning_rate,
        lr_scheduler_type="constant",  # the two continued runs share the schedule whatever max_steps was
        warmup_steps=0,
        beta=0.0,
        logging_steps=1,
        save_steps=mode.save_steps,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=mode.lora_r, lora_alpha=2 * mode.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    dataset = Dataset.from_list(train_prompts(max(2000, mode.t_total * mode.prompts_per_step * 2), seed=seed))
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=str(base),
        reward_funcs=reward_exact,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def run_grpo(
    base: Path, out_dir: Path, mode: Mode, max_steps: int, *, resume_from: Path | None = None, seed: int = 0, callbacks=()
) -> list[dict]:
    """Train (or resume) to ``max_steps``; return the per-step log history."""
    trainer = make_trainer(base, out_dir, mode, max_steps, seed, callbacks)
    started = time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    first = int(resume_from.name.split("-")[1]) if resume_from else 0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h and h["step"] > first]
    log(
        f"  {out_dir.name}: steps {first + 1}..{trainer.state.global_step} in {time.time() - started:.0f}s, "
        f"mean training reward {sum(rewards) / max(len(rewards), 1):.3f}"
    )
    return [h for h in trainer.state.log_history if "reward" in h]


def checkpoints(run: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in run.glob("checkpoint-*") if p.is_dir()}


def evaluate_run(base: Path, run: Path, problems, tokenizer) -> dict[int, float]:
    return {step: accuracy(load_with_adapter(base, path), tokenizer, problems) for step, path in sorted(checkpoints(run).items())}


# -------------------------------------------------------------------------------------- nextoffline


def nextoffline_command() -> list[str]:
    exe = Path(sys.executable).with_name("nextoffline")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from nextoffline.cli import main; sys.exit(main())"]


def extrapolate(run: Path, base: Path, out: Path, mode: Mode) -> tuple[dict, list[str]]:
    evaluator = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'evaluate.py'))} --base {shlex.quote(str(base))} "
        f"--split val --size {mode.val_size} --adapter {{adapter}}"
    )
    args = [
        "extrapolate",
        str(run),
        "--method",
        mode.method,
        "--coef",
        mode.coefs,
        "--eval-cmd",
        evaluator,
        "--resumable",
        "--out",
        str(out),
        "--json",
        "--quiet",
        "--eval-timeout",
        "600",
    ]
    log("  $ nextoffline " + " ".join(shlex.quote(a) for a in args))
    proc = subprocess.run(nextoffline_command() + args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nextoffline failed:\n{proc.stderr}")
    return json.loads(proc.stdout), args


# -------------------------------------------------------------------------------------------- one seed


def run_seed(seed: int, mode: Mode, work: Path, tokenizer) -> dict:
    """Steps 1-5 for one seed in ``work``; returns this seed's numbers."""
    torch.manual_seed(seed)
    test = eval_set(mode.test_size, "test")
    log(f"[seed {seed}] 1. SFT warm-up to {mode.sft_target:.0%} validation accuracy")
    model = build_model(tokenizer, seed=seed)
    sft_steps, _ = sft_until(model, tokenizer, target=mode.sft_target, max_steps=mode.sft_max_steps, check_every=25, seed=seed + 1, log=log)
    base = work / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    base_acc = accuracy(load_with_adapter(base, None), tokenizer, test)
    log(f"  base model after {sft_steps} SFT steps: test accuracy {base_acc:.3f}")

    log(f"[seed {seed}] 2. GRPO + LoRA for {mode.t1} steps, checkpoint every {mode.save_steps}")
    grpo = work / "grpo"
    phase1_log = run_grpo(base, grpo, mode, mode.t1, seed=seed)
    phase1_acc = evaluate_run(base, grpo, test, tokenizer)
    log("  test accuracy per checkpoint: " + ", ".join(f"{s}: {a:.3f}" for s, a in phase1_acc.items()))

    log(f"[seed {seed}] 3. nextoffline: extrapolate, score the candidates on the validation split, keep the best (resumable)")
    summary, nextoffline_args = extrapolate(grpo, base, work / "extrapolated", mode)
    selected = summary["selected"]
    for c in summary["candidates"]:
        log(f"  {c['label']:<8} step {c['step']:>6.1f}: validation accuracy {c['score']:.3f}{'  <- selected' if c['selected'] else ''}")
    extrapolated_acc = accuracy(load_with_adapter(base, work / "extrapolated"), tokenizer, test)

    log(f"[seed {seed}] 4. continue GRPO to step {mode.t_total} from both checkpoint-{mode.t1} folders")
    baseline, continued = work / "baseline", work / "extrapolated_continued"
    baseline_log = run_grpo(base, baseline, mode, mode.t_total, resume_from=grpo / f"checkpoint-{mode.t1}", seed=seed)
    continued_log = run_grpo(base, continued, mode, mode.t_total, resume_from=Path(summary["resume"]["checkpoint_dir"]), seed=seed)
    rewards = lambda history, after: [{"step": h["step"], "reward": h["reward"]} for h in history if h["step"] > after]  # noqa: E731
    loop = {}
    for name in mode.loop:
        log(f"[seed {seed}] 5. in-run: GRPO 1..{mode.t_total} from the base with ExtrapolationCallback ({LOOP_LABELS[name]})")
        loop[name] = run_loop_variant(base, work / name, mode, seed, name, test, tokenizer)
    return {
        "seed": seed,
        "sft_steps": sft_steps,
        "method": summary["method"],
        "horizon_steps": summary["horizon_steps"],
        "nextoffline_command": "nextoffline " + " ".join(shlex.quote(a) for a in nextoffline_args),
        "candidates": summary["candidates"],
        "selected": selected,
        "accuracy": {
            "sft_base": base_acc,
            "grpo_phase1": {str(k): v for k, v in phase1_acc.items()},
            "extrapolated": extrapolated_acc,
            "baseline": {str(k): v for k, v in evaluate_run(base, baseline, test, tokenizer).items()},
            "extrapolated_continued": {str(k): v for k, v in evaluate_run(base, continued, test, tokenizer).items()},
        },
        "reward": {
            "grpo_phase1": rewards(phase1_log, 0),
            "baseline": rewards(baseline_log, mode.t1),
            "extrapolated_continued": rewards(continued_log, mode.t1),
        },
        "loop": loop,
    }


# ----------------------------------------------------------------------------- in-run extrapolation


LOOP_LABELS = {
    "jump_once": "one jump at T1, optimizer moments kept",
    "jump_once_rescale": "one jump at T1, moments rescaled",
    "jump_once_reset": "one jump at T1, moments reset",
    "jump_every": "a jump every T1/2 steps, moments kept",
    "jump_once_auto": "one jump at T1 with method auto (backtest decides)",
    "jump_once_eval": "one jump at T1, kept only if validation accuracy does not drop",
}


def loop_callback(name: str, mode: Mode, tokenizer):
    """The ``ExtrapolationCallback`` of one variant (linear, coefficient 1, like the sweep's coef_1)."""
    from nextoffline.integrations.trl import ExtrapolationCallback

    if name == "jump_every":
        return ExtrapolationCallback(every=mode.t1 // 2, method=mode.method, coef=1.0)
    if name == "jump_once_auto":
        return ExtrapolationCallback(at_steps=[mode.t1], method="auto", coef=1.0, next_epochs=200)
    if name == "jump_once_eval":  # the validation split, as the offline sweep's --eval-cmd
        validation = eval_set(mode.val_size, "val")
        return ExtrapolationCallback(
            at_steps=[mode.t1], method=mode.method, coef=1.0, eval_fn=lambda model: accuracy(model, tokenizer, validation)
        )
    moments = {"jump_once": "keep", "jump_once_rescale": "rescale", "jump_once_reset": "reset"}[name]
    return ExtrapolationCallback(at_steps=[mode.t1], method=mode.method, coef=1.0, optimizer_moments=moments)


def run_loop_variant(base: Path, out: Path, mode: Mode, seed: int, name: str, problems, tokenizer) -> dict:
    """A fresh GRPO run to ``t_total`` with the callback: jumps, test accuracy (checkpoints and jumped adapters), reward."""
    callback = loop_callback(name, mode, tokenizer)
    history = run_grpo(base, out, mode, mode.t_total, seed=seed, callbacks=[callback])
    every = 1 if mode.t_total <= 20 else 2
    steps = {s: p for s, p in checkpoints(out).items() if s % (every * mode.save_steps) == 0 or s == mode.t_total}
    jumps = [
        {
            "step": r.step,
            "applied": r.applied,
            "method": r.method,
            "backtest_error": r.backtest_error,
            "relative_update": r.relative_update,
            "eval_before": r.score_before,
            "eval_after": r.score_after,
            "note": r.note,
        }
        for r in callback.records
    ]
    after_jump = {
        str(r.step): accuracy(load_with_adapter(base, Path(r.folder)), tokenizer, problems) for r in callback.records if r.applied
    }
    for jump in jumps:
        state = "applied" if jump["applied"] else "not applied"
        log(f"  jump at step {jump['step']}: {jump['method']} {state}: {jump['note']} (backtest error {jump['backtest_error']})")
    return {
        "accuracy": {str(s): accuracy(load_with_adapter(base, p), tokenizer, problems) for s, p in sorted(steps.items())},
        "after_jump": after_jump,
        "jumps": jumps,
        "reward": [{"step": h["step"], "reward": h["reward"]} for h in history if "reward" in h],
    }


# ------------------------------------------------------------------------------------------ report


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def std(values) -> float:
    values = list(values)
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


RUNS = (
    ("baseline", "#1f77b4", "-", "continued from the real checkpoint"),
    ("extrapolated_continued", "#ff7f0e", "--", "continued from the extrapolated checkpoint"),
)
PREFIX = ("grpo_phase1", "black", "-", "GRPO before extrapolation")
SEED_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log("  (matplotlib is not installed: no results.png)")
        return
    t1, seeds = results["t1"], results["seeds"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True, gridspec_kw={"width_ratios": [1.25, 0.8, 1.1]})
    several = len(seeds) > 1
    legend = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "fontsize": 8, "frameon": False}

    def curve(key: str, seed: dict) -> tuple[list[int], list[float]]:
        acc = seed["accuracy"]
        if key == "grpo_phase1":
            points = {0: acc["sft_base"], **{int(k): v for k, v in acc["grpo_phase1"].items()}}
        else:
            start = acc["grpo_phase1"][str(t1)] if key == "baseline" else acc["extrapolated"]
            points = {t1: start, **{int(k): v for k, v in acc[key].items()}}
        return list(points), list(points.values())

    # 1. test accuracy along training
    for key, color, style, label in (PREFIX, *RUNS):
        per_seed = [curve(key, seed) for seed in seeds]
        steps = per_seed[0][0]
        if several:
            for _, values in per_seed:
                ax1.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
        ax1.plot(
            steps,
            [mean(v[i] for _, v in per_seed) for i in range(len(steps))],
            style,
            marker="o",
            color=color,
            markersize=3.5,
            linewidth=2.2 if key == "baseline" else 1.5,
            label=label + (f" (mean of {len(seeds)} seeds; thin: each seed)" if several else ""),
        )
    ax1.plot(
        t1,
        mean(s["accuracy"]["extrapolated"] for s in seeds),
        "*",
        color="#d62728",
        markersize=15,
        zorder=5,
        label="adapter selected by the sweep (validation)",
    )
    ax1.axvline(t1, color="#999999", linestyle=":", linewidth=1)
    ax1.set_xlabel("GRPO step")
    ax1.set_ylabel(f"test accuracy ({results['test_size']} held-out problems)")
    ax1.set_title("Held-out exact-match accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend(**legend)

    # 2. the candidate sweep: validation accuracy relative to coefficient 0
    for i, seed in enumerate(seeds):
        coefs = [c["coef"] for c in seed["candidates"]]
        reference = next(c["score"] for c in seed["candidates"] if c["coef"] == 0)
        ax2.plot(
            coefs,
            [c["score"] - reference for c in seed["candidates"]],
            "o-",
            color=SEED_COLORS[i % len(SEED_COLORS)],
            label=f"seed {seed['seed']}",
        )
        chosen = seed["selected"]
        ax2.plot(
            chosen["coef"], chosen["score"] - reference, "*", color="#d62728", markersize=13, zorder=5, label="selected" if i == 0 else None
        )
    ax2.axhline(0, color="#7f7f7f", linestyle="--", linewidth=1)
    ax2.set_xlabel(f"coefficient (0 = checkpoint-{t1}; 1 = {results['horizon_steps']:g} steps ahead)")
    ax2.set_ylabel("validation accuracy minus coefficient 0")
    ax2.set_title(f"Candidate sweep ({results['method']})")
    ax2.grid(alpha=0.3)
    ax2.legend(**{**legend, "ncol": min(4, len(seeds) + 1)})

    # 3. training reward
    window = 5
    for key, color, style, label in (PREFIX, *RUNS):
        histories = [s["reward"][key] for s in seeds]
        steps = [h["step"] for h in histories[0]]
        values = [mean(h[i]["reward"] for h in histories) for i in range(len(steps))]
        smooth = [mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        ax3.plot(steps, values, ".", color=color, alpha=0.3)
        ax3.plot(steps, smooth, style, color=color, linewidth=2.2 if key == "baseline" else 1.5, label=f"{label} ({window}-step mean)")
    ax3.axvline(t1, color="#999999", linestyle=":", linewidth=1)
    ax3.set_xlabel("GRPO step")
    ax3.set_ylabel("training reward per step" + (" (mean over seeds)" if several else ""))
    ax3.set_title("Training reward")
    ax3.grid(alpha=0.3)
    ax3.legend(**legend)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    t1, total, seeds = results["t1"], results["t_total"], results["seeds"]

    def cell(values: list[float]) -> str:
        return f"{mean(values):.3f} ± {std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    acc = lambda key: [s["accuracy"][key] for s in seeds]  # noqa: E731
    at = lambda key, step: [s["accuracy"][key][str(step)] for s in seeds]  # noqa: E731
    reward = lambda key: [mean(h["reward"] for h in s["reward"][key]) for s in seeds]  # noqa: E731
    n = f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    lines = [
        f"| model | GRPO steps | test accuracy{n} | mean train reward, steps {t1 + 1}..{total} |",
        "|---|---:|---:|---:|",
        f"| SFT base | 0 | {cell(acc('sft_base'))} | |",
        f"| GRPO checkpoint | {t1} | {cell(at('grpo_phase1', t1))} | |",
        f"| extrapolated ({results['method']}, best of coef 0,{results['settings']['coefs']} on validation) | {t1} | {cell(acc('extrapolated'))} | |",
        f"| **baseline**: GRPO continued from checkpoint-{t1} | {total} | {cell(at('baseline', total))} | {cell(reward('baseline'))} |",
        f"| **GRPO continued from the extrapolated checkpoint** | {total} | {cell(at('extrapolated_continued', total))} | "
        f"{cell(reward('extrapolated_continued'))} |",
        "",
        f"Paired difference at step {total} (continued from the extrapolated checkpoint minus baseline, same seed): "
        + ", ".join(
            f"seed {s['seed']}: {s['accuracy']['extrapolated_continued'][str(total)] - s['accuracy']['baseline'][str(total)]:+.3f}"
            for s in seeds
        )
        + (
            f"; mean {mean(s['accuracy']['extrapolated_continued'][str(total)] - s['accuracy']['baseline'][str(total)] for s in seeds):+.3f}"
            if len(seeds) > 1
            else ""
        )
        + ".",
        "",
        "Per seed: candidate sweep (validation accuracy, coefficient 0 = checkpoint-%d) and test accuracy at step %d:" % (t1, total),
        "",
        "| seed | "
        + " | ".join(c["label"] for c in seeds[0]["candidates"])
        + f" | selected | baseline @ {total} | extrapolated+continued @ {total} |",
        "|---:|" + "---:|" * len(seeds[0]["candidates"]) + "---|---:|---:|",
    ]
    for s in seeds:
        scores = " | ".join(f"{c['score']:.3f}" for c in s["candidates"])
        lines.append(
            f"| {s['seed']} | {scores} | {s['selected']['label']} (step {s['selected']['step']:g}) | "
            f"{s['accuracy']['baseline'][str(total)]:.3f} | {s['accuracy']['extrapolated_continued'][str(total)]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _baseline_curve(seed: dict) -> dict[int, float]:
    acc = seed["accuracy"]
    return {0: acc["sft_base"], **{int(k): v for k, v in acc["grpo_phase1"].items()}, **{int(k): v for k, v in acc["baseline"].items()}}


def _baseline_reward(seed: dict) -> list[dict]:
    return seed["reward"]["grpo_phase1"] + seed["reward"]["baseline"]


def _reward_mean(history: list[dict], first: int, last: int) -> float:
    return mean(h["reward"] for h in history if first <= h["step"] <= last)


def loop_markdown(results: dict) -> str:
    """The in-run callback variants against the baseline at equal steps."""
    t1, total, seeds = results["t1"], results["t_total"], results["seeds"]
    names = list(seeds[0]["loop"])
    if not names:
        return ""
    n, early = len(seeds), min(t1 + 5, total)

    def cell(values: list[float]) -> str:
        return f"{mean(values):.3f} ± {std(values):.3f}" if n > 1 else f"{values[0]:.3f}"

    base_acc = [s["accuracy"]["baseline"][str(total)] for s in seeds]
    lines = [
        f"In-run `ExtrapolationCallback` ({results['method']} unless named, coefficient 1), each a fresh GRPO run to step {total}; "
        f"baseline = plain GRPO to step {total} (the same run as above). Test accuracy at step {total}"
        + (f", mean ± std over {n} seeds" if n > 1 else "")
        + ":",
        "",
        f"| run | jumps applied | test accuracy @ {total} | minus baseline, per seed | train reward {t1 + 1}..{early} | "
        f"train reward {t1 + 1}..{total} |",
        "|---|---|---:|---|---:|---:|",
        f"| **baseline** | none | {cell(base_acc)} | | {cell([_reward_mean(_baseline_reward(s), t1 + 1, early) for s in seeds])} | "
        f"{cell([_reward_mean(_baseline_reward(s), t1 + 1, total) for s in seeds])} |",
    ]
    for name in names:
        runs = [s["loop"][name] for s in seeds]
        applied = sorted({j["step"] for r in runs for j in r["jumps"] if j["applied"]})
        counts = "; ".join(f"{sum(j['applied'] for j in r['jumps'])}/{len(r['jumps'])}" for r in runs)
        acc = [r["accuracy"][str(total)] for r in runs]
        diffs = ", ".join(f"{a - b:+.3f}" for a, b in zip(acc, base_acc))
        lines.append(
            f"| {name}: {LOOP_LABELS[name]} | {counts} (steps {', '.join(map(str, applied)) or '-'}) | {cell(acc)} | {diffs} | "
            f"{cell([_reward_mean(r['reward'], t1 + 1, early) for r in runs])} | {cell([_reward_mean(r['reward'], t1 + 1, total) for r in runs])} |"
        )
    after = []
    for name in names:
        steps = sorted({int(k) for s in seeds for k in s["loop"][name]["after_jump"]})
        for step in steps:
            pairs = [
                (s["loop"][name]["after_jump"][str(step)], _at(s, name, step)) for s in seeds if str(step) in s["loop"][name]["after_jump"]
            ]
            after.append(f"{name} @ {step}: {mean(a for a, _ in pairs):.3f} vs {mean(b for _, b in pairs):.3f} ({len(pairs)} seed(s))")
    if after:
        lines += [
            "",
            "Test accuracy of the jumped adapter itself (before training from it) vs the checkpoint it jumped from: "
            + "; ".join(after)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _at(seed: dict, name: str, step: int) -> float:
    """Test accuracy of a variant's checkpoint (saved just before its jump); NaN when not evaluated."""
    return seed["loop"][name]["accuracy"].get(str(step), float("nan"))


def plot_loop(results: dict, path: Path) -> None:
    """Test accuracy and training reward along training: baseline vs each in-run variant (mean over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return
    seeds, t1 = results["seeds"], results["t1"]
    names = list(seeds[0]["loop"])
    if not names:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    colors = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
    series = [("baseline", "#1f77b4", [_baseline_curve(s) for s in seeds], [_baseline_reward(s) for s in seeds])]
    for i, name in enumerate(names):
        curves = [{0: s["accuracy"]["sft_base"], **{int(k): v for k, v in s["loop"][name]["accuracy"].items()}} for s in seeds]
        series.append((name, colors[i % len(colors)], curves, [s["loop"][name]["reward"] for s in seeds]))
    common = set.intersection(*(set(c) for _, _, curves, _ in series for c in curves))  # steps every run was evaluated at
    for label, color, curves, rewards in series:
        steps = sorted(common)
        ax1.plot(
            steps,
            [mean(c[k] for c in curves) for k in steps],
            "o--" if label == "baseline" else "o-",
            color=color,
            markersize=3,
            label=label,
            linewidth=2 if label == "baseline" else 1.3,
            zorder=5 if label == "baseline" else 2,  # on top: runs that did not jump lie on it
        )
        reward_steps = sorted({h["step"] for h in rewards[0]})
        values = [mean(h["reward"] for r in rewards for h in r if h["step"] == k) for k in reward_steps]
        smooth = [mean(values[max(0, i - 4) : i + 1]) for i in range(len(values))]
        ax2.plot(
            reward_steps,
            smooth,
            "--" if label == "baseline" else "-",
            color=color,
            label=f"{label} (5-step mean)",
            linewidth=2 if label == "baseline" else 1.3,
            zorder=5 if label == "baseline" else 2,
        )
    for name, color, *_ in series[1:]:
        for seed in seeds[:1]:
            for jump in seed["loop"][name]["jumps"]:
                if jump["applied"]:
                    ax1.axvline(jump["step"], color=color, linestyle=":", linewidth=0.8)
    for ax, ylabel in ((ax1, f"test accuracy ({results['test_size']} problems)"), (ax2, "training reward")):
        ax.axvline(t1, color="#999999", linestyle=":", linewidth=1)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(ylabel + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("In-run ExtrapolationCallback vs baseline: held-out accuracy")
    ax2.set_title("Training reward")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: one seed, few steps (about a minute)")
    parser.add_argument("--workdir", type=Path, default=Path("tiny_grpo_addition_run"), help="where everything is written (replaced)")
    parser.add_argument("--seeds", default=None, help="comma list of seeds (default: 0,1,2; --quick: 0)")
    parser.add_argument("--method", default=None, help="nextoffline --method (default: linear, i.e. RELEX; try auto or next)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads, also for the evaluator (the model is tiny: 1 is fastest)"
    )
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    if args.method:
        mode = replace(mode, method=args.method)
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else mode.seeds
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the evaluator subprocesses
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.time()
    tokenizer = build_tokenizer()
    per_seed = [run_seed(seed, mode, work / f"seed_{seed}", tokenizer) for seed in seeds]
    results = {
        "mode": "quick" if args.quick else "full",
        "settings": asdict(mode),
        "t1": mode.t1,
        "t_total": mode.t_total,
        "test_size": mode.test_size,
        "val_size": mode.val_size,
        "method": per_seed[0]["method"],
        "horizon_steps": per_seed[0]["horizon_steps"],
        "seeds": per_seed,
        "seconds": round(time.time() - started, 1),
    }
    write_json(work / "results.json", results)
    table = markdown(results) + "\n" + loop_markdown(results)
    (work / "results.md").write_text(table)
    plot(results, work / "results.png")
    plot_loop(results, work / "results_loop.png")
    log("")
    log(table)
    log(
        f"wrote {work / 'results.md'}, {work / 'results.png'}, {work / 'results_loop.png'} and {work / 'results.json'} ({results['seconds']:.0f}s in all)"
    )


if __name__ == "__main__":
    main()
