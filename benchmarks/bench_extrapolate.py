#!/usr/bin/env python
"""Whole ``extrapolate`` on the 7B-shaped trajectory: wall time per phase and peak RSS.

Runs ``nextoffline.pipeline.extrapolate`` + ``nextoffline.output.save_extrapolation`` (what
``nextoffline extrapolate --method M --coef 1`` does) once per method, each in a fresh child
process, and times its phases by wrapping the pipeline's internals:

* ``read``: time spent producing chunks (reading + widening + checks; both passes) and
  reading the latest adapter;
* ``decompose``: ``Predictor.observe`` (linear: trajectory Gram + eigen; next: rank-1
  triplets of global, local and target deltas);
* ``fit``: ``Predictor.fit`` (linear: regressors; next: MLP training);
* ``predict+refactor``: ``predict_update``, re-factoring to rank r and casting;
* ``write``: ``save_extrapolation`` (safetensors, manifest with source hashes, model card).

``--method next`` runs with a reduced number of epochs (``--next-epochs``, default 20); the
reference 1000-epoch fit time is projected linearly and reported separately.

Usage: ``python benchmarks/bench_extrapolate.py [--quick] [--methods linear,next] [--next-epochs N]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

PHASES = ("load", "read", "decompose", "fit", "predict+refactor", "write")


def _instrument(acc: dict[str, float]) -> None:
    """Wrap pipeline internals so that each phase accumulates its wall time in ``acc``."""
    import nextoffline.output as output
    import nextoffline.pipeline as pipeline
    from nextoffline.ops.predictors.base import Predictor

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[phase] += time.perf_counter() - start

        return wrapper

    original_chunks = pipeline.stream_chunks

    def chunks(*args, **kwargs):
        gen = original_chunks(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(gen)
            except StopIteration:
                acc["read"] += time.perf_counter() - start
                return
            acc["read"] += time.perf_counter() - start
            yield item

    pipeline.stream_chunks = chunks
    if hasattr(pipeline, "_latest_tensors"):
        pipeline._latest_tensors = timed(pipeline._latest_tensors, "read")
    for name in ("refactor_keep_rank", "refactor_grow_rank", "_store"):
        if hasattr(pipeline, name):
            setattr(pipeline, name, timed(getattr(pipeline, name), "predict+refactor"))
    output.save_extrapolation = timed(output.save_extrapolation, "write")
    for cls in _predictor_classes(Predictor):
        for method, phase in (("observe", "decompose"), ("fit", "fit"), ("predict_update", "predict+refactor")):
            if method in cls.__dict__:
                setattr(cls, method, timed(cls.__dict__[method], phase))


def _predictor_classes(base):
    import nextoffline.ops.predictors  # noqa: F401  (registers the classes)

    seen, stack = [], [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


def child_run(args) -> dict:
    import torch

    acc: dict[str, float] = defaultdict(float)
    _instrument(acc)
    import nextoffline.output as output
    from nextoffline.pipeline import NextOptions, PredictorOptions, RunSettings, extrapolate
    from nextoffline.trajectory import load_trajectory

    rss_import = common.peak_rss_gb()
    start = time.perf_counter()
    trajectory = load_trajectory(args.root)
    acc["load"] += time.perf_counter() - start
    options = PredictorOptions(next=NextOptions(epochs=args.next_epochs))
    settings = RunSettings(device=torch.device(args.device), progress=False, predictors=options)
    result = extrapolate(trajectory, settings, method=args.method, coefs=[1.0])
    out = args.out / f"out-{args.method}"
    output.save_extrapolation(out, trajectory, result, command=f"bench_extrapolate --method {args.method}", overwrite=True)
    wall = time.perf_counter() - start
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    cand = result.candidates[0]
    return {
        "method": args.method,
        "wall_s": wall,
        "phases": dict(acc),
        "peak_rss_gb": common.peak_rss_gb(),
        "rss_after_import_gb": rss_import,
        "written_bytes": written,
        "kept_energy_mean": cand.kept_energy_mean,
        "relative_update": cand.relative_update,
        "settings": result.predictor_settings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 8 checkpoints")
    parser.add_argument("--methods", default="linear,next", help="comma list (default linear,next)")
    parser.add_argument("--next-epochs", type=int, default=20, help="NExt training epochs (reference: 1000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(child_run(args)))
        return

    params = common.TrajectoryParams.preset(args.quick)
    root = common.ensure_trajectory(params)
    files = common.weight_files(root)
    machine = common.machine_description()
    script = Path(__file__).resolve()
    results = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        common.warm_page_cache(files)
        child = [
            "--child",
            "--method",
            method,
            "--root",
            str(root),
            "--out",
            str(common.bench_root()),
            "--device",
            args.device,
            "--next-epochs",
            str(args.next_epochs),
        ]
        child += ["--threads", str(args.threads)] if args.threads else []
        results.append(common.run_child(script, child))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "params": params.__dict__, "results": results}, indent=2) + "\n")

    gib = sum(f.stat().st_size for f in files) / 2**30
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, torch {machine['torch']} "
        f"({machine['threads']} threads), cuda: {machine['cuda']}, load avg {machine['load_1min']}"
    )
    print(
        f"trajectory: {params.layers} layers, {params.layers * 7} modules, {params.checkpoints} checkpoints, r={params.rank}, "
        f"bf16, {gib:.2f} GiB ({root}); extrapolate --coef 1 on {args.device}"
    )
    header = "| method | " + " | ".join(PHASES) + " | total s | peak RSS GB |"
    print(header)
    print("|" + "---|" * (len(PHASES) + 3))
    for res in results:
        label = res["method"] + (f" ({args.next_epochs} epochs)" if res["method"] == "next" else "")
        cells = " | ".join(f"{res['phases'].get(p, 0.0):.2f}" for p in PHASES)
        print(f"| {label} | {cells} | {res['wall_s']:.2f} | {res['peak_rss_gb']:.2f} |")
    for res in results:
        if res["method"] == "next":
            fit = res["phases"].get("fit", 0.0)
            projected = res["wall_s"] - fit + fit / args.next_epochs * 1000
            print(
                f"next: fit {fit / args.next_epochs:.3f} s/epoch -> reference 1000 epochs: fit ~{fit / args.next_epochs * 1000:.0f} s, "
                f"total ~{projected:.0f} s (projected)"
            )
    for res in results:
        print(
            f"{res['method']}: kept energy {res['kept_energy_mean']:.4f}, relative update {res['relative_update']:.3g}, "
            f"wrote {res['written_bytes'] / 2**20:.0f} MiB, RSS after imports {res['rss_after_import_gb']:.2f} GB"
        )
    line = " ".join(f"{r['method']}_s={r['wall_s']:.1f} {r['method']}_peak_rss_gb={r['peak_rss_gb']:.2f}" for r in results)
    print(line)


if __name__ == "__main__":
    main()
