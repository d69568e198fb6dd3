"""Full-parameter trajectory of a Qwen2.5-0.5B-shaped model: decomposition vs read, peak RSS, 2 processes vs 1.

    python benchmarks/bench_fullparam.py --dtype bf16            # 16 checkpoints, ~15.8 GB on disk
    python benchmarks/bench_fullparam.py --dtype fp32            # ~31.6 GB on disk
    python benchmarks/bench_fullparam.py --dtype bf16 --layers 4 --checkpoints 8   # quick

The trajectory is generated on the fly under ``--work`` (default ``$TMPDIR/nextoffline-bench-full``)
and removed afterwards unless ``--keep``: ``step_N/model.safetensors`` with Qwen2.5-0.5B shapes
(vocab 151936, hidden 896, intermediate 4864, 2 KV heads of 64, q/k/v biases, tied embeddings,
24 layers: 494M parameters), ``W_t = W_0 + sqrt(t) D`` plus per-step noise (one noise tensor, rolled by the step). Each measurement runs
in a fresh child process (timings and peak RSS do not mix):

- ``read``: every byte of every checkpoint read once with ``os.preadv`` into a fixed buffer;
- ``decompose``: the statistics pass of ``nextoffline extrapolate`` (per tensor, the K x K temporal
  Gram of the global deltas, streamed slab by slab under ``--chunk-mb``), with its peak RSS
  (``VmHWM``) and the RSS right after imports; once with all checkpoints and once with the first 4,
  to show that the peak does not grow with the number of checkpoints;
- ``decompose x2``: the same under ``torchrun --nproc_per_node 2`` (gloo); wall time of the slowest rank.

Prints one line ``decompose_vs_read=X speedup_2proc=Y peak_rss_gb=Z rss_over_imports_mb=W``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import common  # noqa: E402

_ST = {torch.bfloat16: "BF16", torch.float32: "F32"}


def qwen05_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of Qwen2.5-0.5B (tied embeddings: no lm_head)."""
    hidden, inter, kv, vocab = 896, 4864, 128, 151936
    out = [("model.embed_tokens.weight", (vocab, hidden)), ("model.norm.weight", (hidden,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.q_proj.bias", (hidden,)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return sorted(out)


def _header(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    size = torch.finfo(dtype).bits // 8
    spec, offset = {}, 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * size
        spec[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    spec["__metadata__"] = {"format": "pt"}
    text = json.dumps(spec, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def generate(root: Path, *, layers: int, checkpoints: int, dtype: torch.dtype) -> list[Path]:
    """Write the trajectory tensor by tensor into all step files at once (never a whole model in memory)."""
    shapes = qwen05_shapes(layers)
    header = _header(shapes, dtype)
    steps = [10 * (i + 1) for i in range(checkpoints)]
    paths = [root / f"step_{s}" / "model.safetensors" for s in steps]
    handles = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("wb")
        handle.write(header)
        handles.append(handle)
    gen = torch.Generator().manual_seed(0)
    try:
        for _name, shape in shapes:
            base = torch.randn(shape, generator=gen) * 0.02
            direction = torch.randn(shape, generator=gen) * 1e-3
            noise = torch.randn(shape, generator=gen) * 2e-4
            for step, handle in zip(steps, handles):
                value = (base + math.sqrt(step) * direction + noise.roll(step)).to(dtype)  # roll: cheap per-step noise
                handle.write(value.view(torch.uint8).numpy().tobytes())
    finally:
        for handle in handles:
            handle.close()
    return paths


# -------------------------------------------------------------------------------------- children


def child_read(root: Path) -> dict:
    files = sorted(root.glob("step_*/model.safetensors"))
    start = time.perf_counter()
    total = common.warm_page_cache(files)
    return {"read_s": time.perf_counter() - start, "bytes": total, "peak_rss_gb": common.peak_rss_gb()}


def child_decompose(root: Path, chunk_mb: int, limit: int | None) -> dict:
    from dataclasses import replace

    from nextoffline.dense.dist import init_from_env
    from nextoffline.dense.layout import load_dense_trajectory
    from nextoffline.dense.pipeline import collect_stats

    rss_imports = common.peak_rss_gb()
    trajectory = load_dense_trajectory(root)
    if limit:
        trajectory = replace(trajectory, checkpoints=trajectory.checkpoints[:limit])
    group = init_from_env(torch.device("cpu"))
    group.barrier()
    start = time.perf_counter()
    stats = collect_stats(trajectory, torch.device("cpu"), chunk_mb * 2**20, group)
    wall = time.perf_counter() - start
    walls = group.all_gather(wall)
    rss = group.all_gather(common.peak_rss_gb())
    group.close()
    return {
        "decompose_s": max(walls),
        "tensors": len(stats.keys),
        "checkpoints": len(trajectory.checkpoints),
        "peak_rss_gb": max(rss),
        "rss_after_imports_gb": rss_imports,
        "rank": group.rank,
    }


def _torchrun(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(Path(__file__)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit("torchrun child failed")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return next(line for line in lines if line["rank"] == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--checkpoints", type=int, default=16)
    parser.add_argument("--chunk-mb", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nextoffline-bench-full")
    parser.add_argument("--keep", action="store_true", help="keep the generated trajectory")
    parser.add_argument("--child", choices=["read", "decompose"], default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    root = args.work / f"{args.dtype}-L{args.layers}-K{args.checkpoints}"
    if args.child == "read":
        print(json.dumps(child_read(root)))
        return
    if args.child == "decompose":
        result = child_decompose(root, args.chunk_mb, args.limit)
        if result["rank"] == 0:  # the times and RSS are gathered; one line, so two ranks' output cannot interleave
            print(json.dumps(result), flush=True)
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if not (root / f"step_{10 * args.checkpoints}" / "model.safetensors").is_file():
        start = time.perf_counter()
        generate(root, layers=args.layers, checkpoints=args.checkpoints, dtype=dtype)
        print(f"generated {root} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    base = ["--dtype", args.dtype, "--layers", str(args.layers), "--checkpoints", str(args.checkpoints), "--work", str(args.work)]
    base += ["--chunk-mb", str(args.chunk_mb)]
    try:
        common.run_child(Path(__file__), [*base, "--child", "read"])  # warm the page cache as far as it holds the files
        read = common.run_child(Path(__file__), [*base, "--child", "read"])
        one = common.run_child(Path(__file__), [*base, "--child", "decompose"])
        few = common.run_child(Path(__file__), [*base, "--child", "decompose", "--limit", "4"])
        two = _torchrun([*base, "--child", "decompose"])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "machine": common.machine_description(),
        "dtype": args.dtype,
        "layers": args.layers,
        "checkpoints": args.checkpoints,
        "chunk_mb": args.chunk_mb,
        "bytes": read["bytes"],
        "read": read,
        "decompose": one,
        "decompose_first4": few,
        "decompose_2proc": two,
    }
    print(json.dumps(result, indent=1), file=sys.stderr)
    rss_over = (one["peak_rss_gb"] - one["rss_after_imports_gb"]) * 1000
    print(
        f"decompose_vs_read={one['decompose_s'] / read['read_s']:.2f} speedup_2proc={one['decompose_s'] / two['decompose_s']:.2f} "
        f"peak_rss_gb={one['peak_rss_gb']:.2f} peak_rss_gb_k4={few['peak_rss_gb']:.2f} rss_over_imports_mb={rss_over:.0f} "
        f"read_gbps={read['bytes'] / read['read_s'] / 1e9:.2f}"
    )


if __name__ == "__main__":
    main()
