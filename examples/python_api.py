"""The whole nextoffline pipeline through the Python API, on a synthetic trajectory.

Writes 8 PEFT checkpoints whose LoRA update grows like sqrt(step) (a saturating,
RL-like trajectory with a little noise), then: load -> inspect -> backtest -> extrapolate
-> save. Runs in seconds on a CPU:

    python examples/python_api.py                 # in a temporary folder, deleted at the end
    python examples/python_api.py --workdir runs  # keep everything under runs/
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from nextoffline import RunSettings, backtest, extrapolate, inspect_trajectory, load_trajectory, save_extrapolation
from nextoffline.synthetic import SyntheticSpec, synthetic_factors, write_synthetic_trajectory

STEPS = list(range(10, 90, 10))  # checkpoints saved every 10 steps
TARGET = 120  # predict the adapter at step 120


def effective_update(tensors: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    """dW = scaling * B @ A of one module."""
    key = f"base_model.model.{module}"
    return scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()


def main(workdir: Path) -> None:
    spec = SyntheticSpec(steps=STEPS, law="sqrt", noise=0.02, seed=1)
    run = workdir / "run"
    write_synthetic_trajectory(run, spec)  # run/step_10 ... run/step_80, each a PEFT adapter folder
    print(f"wrote a synthetic trajectory to {run} (steps {STEPS[0]}..{STEPS[-1]})")

    # 1. load: headers only, everything validated up front
    trajectory = load_trajectory(run)
    settings = RunSettings(progress=False)

    # 2. inspect: rank-1 dominance of the updates
    info = inspect_trajectory(trajectory, settings)
    print(
        f"{info['num_modules']} LoRA modules, r={info['rank']}; "
        f"{100 * info['trajectory_explained_variance']:.1f}% of the update energy lies on one direction per module"
    )

    # 3. backtest: fit on steps 10..60, predict 70 and 80 (1.0 = no better than stopping at step 60).
    #    Add "next" to try NExt too: it trains small MLPs, which takes a minute or more on a CPU.
    result = backtest(trajectory, ["linear", "power", "poly", "gp"], settings, holdout=2)
    for name, error in sorted(result.errors.items(), key=lambda kv: kv[1]):
        print(f"  backtest {name:<7} error {error:.3f}")
    best, error = result.best()
    print(f"best predictor: {best} ({error:.3f})")

    # 4. extrapolate with the backtest's winner (method="auto" would run the backtest again itself).
    #    Two candidates: coefficient 0 (the latest checkpoint, the reference) and step 120.
    if best is None:
        print("no predictor beats stopping at the last checkpoint: keep the latest adapter")
        return
    extrapolation = extrapolate(trajectory, settings, method=best, coefs=[0.0], to_steps=[TARGET])
    for candidate in extrapolation.candidates:
        print(
            f"  candidate step {candidate.target_step:g} (coefficient {candidate.coef:.3g}): "
            f"update {candidate.relative_update:.3f} of |dW_last|, {100 * candidate.kept_energy_mean:.1f}% kept at rank r"
        )

    # 5. save: keep only the step-120 candidate (index 1) as a PEFT adapter folder, atomically
    out, _resume = save_extrapolation(workdir / "extrapolated", trajectory, extrapolation, command="examples/python_api.py", keep=[1])
    print(f"wrote {out}")

    # check against the known law: how close is the prediction to the true adapter at step 120?
    module = spec.modules[0][0]
    scaling = spec.alpha / spec.rank
    predicted = effective_update(load_file(out / "adapter_model.safetensors"), module, scaling)
    b, a = synthetic_factors(spec, TARGET, 0)
    truth = scaling * b @ a
    latest = effective_update(load_file(run / f"step_{STEPS[-1]}" / "adapter_model.safetensors"), module, scaling)
    stop_error = float((latest - truth).norm() / truth.norm())
    pred_error = float((predicted - truth).norm() / truth.norm())
    print(f"{module}: relative error at step {TARGET}: {pred_error:.4f} extrapolated vs {stop_error:.4f} by stopping at step {STEPS[-1]}")
    assert math.isfinite(pred_error)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="nextoffline-example-") as tmp:
            main(Path(tmp))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        main(args.workdir)
