"""Score one adapter for ``nextoffline extrapolate --eval-cmd``: held-out addition accuracy.

    python evaluate.py --base WORK/base --adapter ADAPTER_DIR [--split val|test] [--size N]

Loads the base model with the LoRA adapter (PEFT), answers a fixed held-out set of 2-digit
additions greedily and prints the exact-match accuracy as the last line (higher is better).
The validation split is the default: choosing a candidate never looks at the test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from addition import accuracy, build_tokenizer, eval_set, load_with_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the SFT-warmed base model folder")
    parser.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter folder (omit to score the base model)")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="val: for choosing (default); test: final comparison")
    parser.add_argument("--size", type=int, default=None, help="use only the first SIZE problems of the split")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))  # OMP_NUM_THREADS lowers it
    model = load_with_adapter(args.base, args.adapter)
    tokenizer = build_tokenizer()
    problems = eval_set(args.size, args.split)
    acc = accuracy(model, tokenizer, problems)
    print(f"adapter {args.adapter}: {round(acc * len(problems))} of {len(problems)} {args.split} problems correct")
    print(f"{acc:.4f}")


if __name__ == "__main__":
    main()
