#!/usr/bin/env python
"""``auto`` against stopping on the forecasting families, across lead times 0.2x..1x the run.

For each family of ``fixtures/forecast/`` (observed checkpoints + the true future), runs
``nextoffline.pipeline.extrapolate(method="auto")`` once with every target (leads of 0.2, 0.4,
0.6, 0.8 and 1.0 times the 12 observed checkpoints) and scores each written adapter against the
true future checkpoint: ``|dW_pred - dW_true| / |dW_true - dW_last|`` over all modules (1.0 =
stopping at the last checkpoint; dense products are fine at these tiny shapes). Also prints what
``auto`` chose (predictor and time axis), the damping per target and the backtest's own estimate.

Usage: ``python benchmarks/bench_forecast.py [--families saturating,rotating] [--next-epochs N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextoffline.pipeline import NextOptions, PredictorOptions, RunSettings, extrapolate  # noqa: E402
from nextoffline.synthetic import forecast_families  # noqa: E402
from nextoffline.trajectory import load_trajectory  # noqa: E402

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


def effective(tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Dense ``s B A`` per module (tiny shapes only)."""
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = scaling * tensors[f"{module}.lora_B.weight"].double() @ a.double()
    return out


def relative_error(pred: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], last: dict[str, torch.Tensor]) -> float:
    num = sum(float((pred[k] - truth[k]).square().sum()) for k in truth)
    den = sum(float((truth[k] - last[k]).square().sum()) for k in truth)
    return (num / den) ** 0.5


def run_family(name: str, folder: Path, next_epochs: int) -> dict:
    trajectory = load_trajectory(folder / "observed")
    steps = trajectory.step_numbers
    k, spacing = len(steps), (steps[-1] - steps[0]) / (len(steps) - 1)
    targets = [steps[-1] + round(f * k) * spacing for f in FRACTIONS]
    settings = RunSettings(device=torch.device("cpu"), progress=False, predictors=PredictorOptions(next=NextOptions(epochs=next_epochs)))
    start = time.perf_counter()
    result = extrapolate(trajectory, settings, method="auto", to_steps=targets)
    seconds = time.perf_counter() - start
    scaling = trajectory.modules[0].scaling
    last = effective(load_file(trajectory.latest.weights_file), scaling)
    forecast = {round(r["step"]): r for r in result.forecast}
    rows = []
    for f, target, candidate in zip(FRACTIONS, targets, result.candidates):
        truth = effective(load_file(folder / "future" / f"step_{round(target)}" / "adapter_model.safetensors"), scaling)
        record = forecast.get(round(target), {})
        rows.append(
            {
                "fraction": f,
                "target_step": target,
                "lead": round(f * k),
                "error": relative_error(effective(candidate.tensors, scaling), truth, last),
                "damping": record.get("damping", 0.0 if result.method == "none" else 1.0),
                "backtest_damped_error": record.get("damped_error"),
                "band": record.get("band"),
            }
        )
    return {"family": name, "method": result.method, "settings": result.predictor_settings, "seconds": seconds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(forecast_families()), help="comma list")
    parser.add_argument("--next-epochs", type=int, default=1000, help="NExt epochs (default: the reference 1000; auto may skip it)")
    parser.add_argument("--fixtures", type=Path, default=ROOT / "fixtures" / "forecast")
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [run_family(name, args.fixtures / name, args.next_epochs) for name in args.families.split(",") if name]
    print("error = |pred - true| / |true - last observed| at each lead (1.0 = stopping; lower is better)")
    print("| family | auto chose | " + " | ".join(f"{f:.1f}x" for f in FRACTIONS) + " | worst | s |")
    print("|---|---|" + "---:|" * (len(FRACTIONS) + 2))
    for res in results:
        axis = res["settings"].get("time_axis", "step") if res["method"] != "none" else "-"
        cells = " | ".join(f"{r['error']:.3f} (a={r['damping']:.2f})" for r in res["rows"])
        worst = max(r["error"] for r in res["rows"])
        print(f"| {res['family']} | {res['method']} ({axis}) | {cells} | {worst:.3f} | {res['seconds']:.0f} |")
    never_worse = all(r["error"] <= 1.0 + 1e-6 for res in results for r in res["rows"])
    print(f"auto never worse than stopping: {never_worse}")
    for res in results:
        means = sum(r["error"] for r in res["rows"]) / len(res["rows"])
        print(f"{res['family']}_mean_error={means:.3f}", end=" ")
    print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
