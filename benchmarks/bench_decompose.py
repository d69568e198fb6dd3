#!/usr/bin/env python
"""Decomposition of a 7B-shaped LoRA trajectory vs reading its bytes vs the dense reference.

One run measures, each in a fresh child process (so timings and peak RSS do not mix):

* ``read``: every factor byte of the trajectory copied from the (warmed) page cache into
  staging memory with the loader's own reader (:func:`nextoffline.loader.read_raw`), no math.
  This is the I/O floor.
* ``ours``: the same reads, then widening/checks (:func:`~nextoffline.loader.to_chunk`) and
  :func:`~nextoffline.ops.chunk.rank1_features`: the global and local rank-1 triplets of every
  module at every step (and, timed separately, the NExt target deltas too). The compute time
  excludes the reads; ``end-to-end`` streams with the loader's reader thread
  (:func:`~nextoffline.loader.iter_chunks`) and reports the peak RSS of that process.
* ``dense``: the reference NExt method (merge ``s B @ A`` to a dense fp32 matrix, then
  ``torch.linalg.svd(full_matrices=False)``) timed on one module of selected shapes and scaled
  to the whole trajectory (unmeasured shapes by the ``m n min(m, n)`` cost model of the largest
  measured shape). The same modules are checked against our triplets (accuracy).

* ``copy``: the same staged bytes copied to the compute device (pinned host-to-device on CUDA,
  a memory copy on CPU): the device floor.

Prints one line ``decompose_vs_read=X dense_vs_ours=Y peak_rss_gb=Z`` (plus
``decompose_vs_h2d_bandwidth=W`` with ``--device cuda``) and a table, where
``decompose_vs_read`` = decomposition compute time (global+local) / read time,
``dense_vs_ours`` = scaled dense time / our compute time (global+local, same set of triplets) and
``decompose_vs_h2d_bandwidth`` = host-to-device copy time / decomposition compute time (which
includes its own host-to-device copy): the decomposition's throughput as a fraction of the copy
bandwidth (target >= 0.5).

Usage: ``python benchmarks/bench_decompose.py [--quick] [--device cuda] [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# ------------------------------------------------------------------------------------ children


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_read(args) -> dict:
    from nextoffline.loader import BufferPool, open_readers, plan_chunks, read_raw
    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(args.root)
    plans = plan_chunks(trajectory, budget_bytes=args.chunk_bytes)
    staging = BufferPool()
    pin = args.device.startswith("cuda")
    total = 0
    with open_readers(trajectory) as readers:
        start = time.perf_counter()
        for plan in plans:
            raw = read_raw(plan, trajectory, readers, buffers=staging, pin_memory=pin)
            total += raw.nbytes
        wall = time.perf_counter() - start
    return {"read_s": wall, "bytes": total, "peak_rss_gb": common.peak_rss_gb()}


def child_copy(args) -> dict:
    """The device floor: the same staged bytes copied to the compute device (host-to-device on
    CUDA from pinned staging memory, as the loader does; a plain memory copy on CPU)."""
    import torch

    from nextoffline.loader import BufferPool, open_readers, plan_chunks, read_raw
    from nextoffline.trajectory import load_trajectory

    device = torch.device(args.device)
    trajectory = load_trajectory(args.root)
    plans = plan_chunks(trajectory, budget_bytes=args.chunk_bytes)
    staging, targets = BufferPool(), BufferPool() if device.type == "cpu" else None
    total, wall = 0, 0.0
    with open_readers(trajectory) as readers:
        for plan in plans:
            raw = read_raw(plan, trajectory, readers, buffers=staging, pin_memory=device.type == "cuda")
            _sync(device)
            start = time.perf_counter()
            for name, tensor in (("b", raw.b), ("a", raw.a)):
                if targets is not None:
                    targets.take(name, tensor.shape, tensor.dtype).copy_(tensor)
                else:
                    tensor.to(device, non_blocking=True)
            _sync(device)
            wall += time.perf_counter() - start
            total += raw.nbytes
    return {"copy_s": wall, "bytes": total}


def child_ours(args) -> dict:
    """Sequential pass: read, widen, decompose each chunk, timing each stage separately."""
    import torch

    from nextoffline.loader import BufferPool, open_readers, plan_chunks, read_raw, to_chunk
    from nextoffline.ops.chunk import rank1_features
    from nextoffline.pipeline import default_horizon
    from nextoffline.trajectory import load_trajectory

    device = torch.device(args.device)
    trajectory = load_trajectory(args.root)
    k = len(trajectory.steps)
    horizon = default_horizon(k)
    plans = plan_chunks(trajectory, budget_bytes=args.chunk_bytes)
    pool = BufferPool()
    times = {"read_s": 0.0, "convert_s": 0.0, "global_local_s": 0.0, "with_targets_s": 0.0}
    triplets = 0
    with open_readers(trajectory) as readers:
        for plan in plans:
            t0 = time.perf_counter()
            raw = read_raw(plan, trajectory, readers, buffers=pool, pin_memory=device.type == "cuda")
            t1 = time.perf_counter()
            chunk = to_chunk(raw, trajectory, device, buffers=pool)
            _sync(device)
            t2 = time.perf_counter()
            rank1_features(chunk, horizon=k, lag=1)  # horizon k: no target deltas
            _sync(device)
            t3 = time.perf_counter()
            if not args.no_targets:
                rank1_features(chunk, horizon=horizon, lag=1)
                _sync(device)
            t4 = time.perf_counter()
            times["read_s"] += t1 - t0
            times["convert_s"] += t2 - t1
            times["global_local_s"] += t3 - t2
            times["with_targets_s"] += t4 - t3
            triplets += len(plan.modules) * (2 * k - 1)
    return {**times, "horizon": horizon, "triplets": triplets, "peak_rss_gb": common.peak_rss_gb()}


def child_stream(args) -> dict:
    """What a user waits for: streamed reads (reader thread) + widening + global/local triplets,
    outputs kept on the CPU (as the NExt predictor keeps them); peak RSS of this process."""
    import torch

    from nextoffline.loader import iter_chunks
    from nextoffline.ops.chunk import rank1_features
    from nextoffline.trajectory import load_trajectory

    device = torch.device(args.device)
    rss_start = common.peak_rss_gb()
    trajectory = load_trajectory(args.root)
    k = len(trajectory.steps)
    kept = []
    start = time.perf_counter()
    for _plan, chunk in iter_chunks(trajectory, device, budget_bytes=args.chunk_bytes, reuse=True):
        features = rank1_features(chunk, horizon=k, lag=1)
        kept.append([(t.sigma.cpu(), t.u.cpu(), t.v.cpu()) for t in [*features.global_, *[x for x in features.local if x is not None]]])
    _sync(device)
    wall = time.perf_counter() - start
    kept_bytes = sum(x.numel() * x.element_size() for chunk in kept for trip in chunk for x in trip)
    return {"wall_s": wall, "peak_rss_gb": common.peak_rss_gb(), "rss_after_import_gb": rss_start, "kept_gb": kept_bytes / 1e9}


def child_dense(args) -> dict:
    """Dense merge + SVD on one module per selected shape (two consecutive steps), plus accuracy."""
    import torch
    from safetensors import safe_open

    from nextoffline.ops.decompose import difference_factors, top_triplet
    from nextoffline.trajectory import load_trajectory

    device = torch.device(args.device)
    trajectory = load_trajectory(args.root)
    shapes = [tuple(json.loads(s)) for s in args.dense_shape]
    out = {}
    worst_sigma, worst_cos = 0.0, 1.0
    f1 = safe_open(str(trajectory.steps[-1].weights_file), "pt")
    f0 = safe_open(str(trajectory.steps[-2].weights_file), "pt")
    for m, n, r in shapes:
        module = trajectory.groups()[(m, n, r)][0]
        s = module.scaling
        b1, a1 = (f1.get_tensor(module.b_key).to(device).float(), f1.get_tensor(module.a_key).to(device).float())
        b0, a0 = (f0.get_tensor(module.b_key).to(device).float(), f0.get_tensor(module.a_key).to(device).float())
        _sync(device)
        t0 = time.perf_counter()
        w1 = s * b1 @ a1
        _sync(device)
        t1 = time.perf_counter()
        u, sv, vh = torch.linalg.svd(w1, full_matrices=False)
        _sync(device)
        t2 = time.perf_counter()
        w0 = s * b0 @ a0
        delta = w1 - w0
        _sync(device)
        time.perf_counter()
        ul, svl, vhl = torch.linalg.svd(delta, full_matrices=False)
        _sync(device)
        t4 = time.perf_counter()
        # local delta = both merges + subtraction + SVD
        out[json.dumps([m, n, r])] = {"merge_s": t1 - t0, "svd_s": t2 - t1, "global_s": t2 - t0, "local_s": (t1 - t0) + (t4 - t2)}
        # accuracy of our factored triplets on the same matrices
        ours_g = top_triplet((s * b1)[None], a1[None])
        left, right = difference_factors(b1[None], a1[None], b0[None], a0[None])
        ours_l = top_triplet(s * left, right)
        for ours, (uu, ss, vv) in ((ours_g, (u, sv, vh)), (ours_l, (ul, svl, vhl))):
            worst_sigma = max(worst_sigma, abs(float(ours.sigma[0]) - float(ss[0])) / float(ss[0]))
            worst_cos = min(worst_cos, abs(float(ours.u[0].double() @ uu[:, 0].double())), abs(float(ours.v[0].double() @ vv[0].double())))
    return {"shapes": out, "sigma_rel_err": worst_sigma, "min_abs_cos": worst_cos}


CHILDREN = {"read": child_read, "copy": child_copy, "ours": child_ours, "stream": child_stream, "dense": child_dense}


# -------------------------------------------------------------------------------------- parent


def _child_args(args, root: Path) -> list[str]:
    out = ["--root", str(root), "--device", args.device, "--chunk-bytes", str(args.chunk_bytes)]
    out += ["--threads", str(args.threads)] if args.threads else []
    return out + (["--no-targets"] if args.no_targets else [])


def _svd_cost(m: int, n: int) -> float:
    return m * n * min(m, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 8 checkpoints (under a minute on 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (reads are always CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="read/decompose repetitions, best kept (default 2 quick, 3 full)")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="loader chunk budget (default: the library default)")
    parser.add_argument(
        "--dense-shapes",
        choices=["small", "all"],
        default="small",
        help="small: time the dense SVD on k/v (quick) or k/v and q/o (full) shapes and model the rest; all: time every shape",
    )
    parser.add_argument("--no-targets", action="store_true", help="skip the extra NExt target-delta timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the measured processes (default: torch's default)")
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dense-shape", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_bytes is None:
        from nextoffline.loader import DEFAULT_CHUNK_BYTES

        args.chunk_bytes = DEFAULT_CHUNK_BYTES
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(CHILDREN[args.child](args)))
        return

    run_start = time.perf_counter()
    params = common.TrajectoryParams.preset(args.quick)
    repeat = args.repeat or (2 if args.quick else 3)
    root = common.ensure_trajectory(params)
    files = common.weight_files(root)
    machine = common.machine_description()
    script = Path(__file__).resolve()
    child = _child_args(args, root)

    reads, copies, ours, streams = [], [], [], []
    for _ in range(repeat):  # interleaved, so that all see the same machine load
        common.warm_page_cache(files)
        reads.append(common.run_child(script, ["--child", "read", *child]))
        copies.append(common.run_child(script, ["--child", "copy", *child]))
        ours.append(common.run_child(script, ["--child", "ours", *child]))
    for _ in range(max(1, repeat - 1)):
        common.warm_page_cache(files)
        streams.append(common.run_child(script, ["--child", "stream", *child]))

    from nextoffline.trajectory import load_trajectory

    trajectory = load_trajectory(root)
    groups = {key: len(mods) for key, mods in trajectory.groups().items()}
    k = params.checkpoints
    by_cost = sorted(groups, key=lambda g: _svd_cost(g[0], g[1]))
    if args.dense_shapes == "all":
        measured = by_cost
    else:
        smallest = _svd_cost(*by_cost[0][:2])
        limit = smallest if args.quick else _svd_cost(params.hidden, params.hidden)
        measured = [g for g in by_cost if _svd_cost(g[0], g[1]) <= limit]
    dense = common.run_child(script, ["--child", "dense", *child, *[x for g in measured for x in ("--dense-shape", json.dumps(list(g)))]])

    read_s = min(r["read_s"] for r in reads)
    read_bytes = reads[0]["bytes"]
    best_ours = min(ours, key=lambda o: o["convert_s"] + o["global_local_s"])
    compute_gl = best_ours["convert_s"] + best_ours["global_local_s"]
    # the second call decomposes global, local and target deltas: the targets cost the difference
    targets_s = max(0.0, min(o["with_targets_s"] for o in ours) - min(o["global_local_s"] for o in ours))
    stream_s = min(s["wall_s"] for s in streams)
    peak_rss = max(s["peak_rss_gb"] for s in streams)
    horizon = best_ours["horizon"]

    reference = max(measured, key=lambda g: _svd_cost(g[0], g[1]))
    ref_times = dense["shapes"][json.dumps(list(reference))]
    dense_gl, dense_targets, notes = 0.0, 0.0, []
    for group, count in groups.items():
        key = json.dumps(list(group))
        if key in dense["shapes"]:
            t = dense["shapes"][key]
            how = "measured"
        else:
            factor = _svd_cost(group[0], group[1]) / _svd_cost(reference[0], reference[1])
            t = {name: value * factor for name, value in ref_times.items()}
            how = f"modeled x{factor:.1f} from {reference[0]}x{reference[1]}"
        dense_gl += count * (k * t["global_s"] + (k - 1) * t["local_s"])
        dense_targets += count * (k - horizon) * t["local_s"]
        notes.append(f"{group[0]}x{group[1]} x{count}: global {t['global_s']:.2f} s, local {t['local_s']:.2f} s ({how})")

    ratio_read = compute_gl / read_s
    copy_s = min(c["copy_s"] for c in copies)
    on_gpu = args.device.startswith("cuda")
    # GPU target: decomposition throughput as a fraction of the host-to-device copy bandwidth
    ratio_copy = copy_s / compute_gl
    ratio_dense = dense_gl / compute_gl
    result = {
        "machine": machine,
        "params": {**params.__dict__, "modules": len(trajectory.modules), "bytes": read_bytes},
        "device": args.device,
        "repeat": repeat,
        "chunk_bytes": args.chunk_bytes,
        "read_s": read_s,
        "read_gbps": read_bytes / read_s / 1e9,
        "ours": ours,
        "streams": streams,
        "reads": reads,
        "compute_global_local_s": compute_gl,
        "targets_extra_s": targets_s,
        "stream_wall_s": stream_s,
        "dense": dense,
        "dense_global_local_s": dense_gl,
        "dense_targets_extra_s": dense_targets,
        "copies": copies,
        "copy_s": copy_s,
        "copy_gbps": read_bytes / copy_s / 1e9,
        "decompose_vs_read": ratio_read,
        "decompose_vs_copy_bandwidth": ratio_copy,
        "end_to_end_vs_read": stream_s / read_s,
        "dense_vs_ours": ratio_dense,
        "peak_rss_gb": peak_rss,
        "bench_wall_s": time.perf_counter() - run_start,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    gib = read_bytes / 2**30
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, torch {machine['torch']} "
        f"({machine['threads']} threads), cuda: {machine['cuda']}, load avg {machine['load_1min']}"
    )
    print(
        f"trajectory: {params.layers} layers, {len(trajectory.modules)} modules, {k} checkpoints, r={params.rank}, bf16, "
        f"{gib:.2f} GiB of factors ({root})"
    )
    print(
        f"device: {args.device}; best of {repeat} (read, decompose), {len(streams)} (streamed); chunk budget {args.chunk_bytes / 2**20:.0f} MiB"
    )
    rows = [
        ("read all factor bytes (page cache, loader's reader)", read_s, f"{read_bytes / read_s / 1e9:.2f} GB/s"),
        (
            "copy the staged bytes to the device" + (" (host-to-device)" if on_gpu else " (memcpy)"),
            copy_s,
            f"{read_bytes / copy_s / 1e9:.2f} GB/s",
        ),
        ("decompose: widen + check" + (" (incl. host-to-device)" if on_gpu else ""), best_ours["convert_s"], ""),
        ("decompose: global+local triplets", best_ours["global_local_s"], f"{best_ours['triplets']} triplets"),
        ("decompose compute total (global+local)", compute_gl, f"{compute_gl / read_s:.2f} x read"),
        ("decompose end-to-end, streamed (reader thread)", stream_s, f"{stream_s / read_s:.2f} x read"),
        (f"  + NExt target deltas (h={horizon}), extra", targets_s, "" if not args.no_targets else "skipped"),
        ("dense merge+SVD (reference), global+local, scaled", dense_gl, f"{dense_gl / compute_gl:.0f} x ours"),
        ("  dense, NExt target deltas, extra, scaled", dense_targets, ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'phase'.ljust(width)} | {'seconds':>10} | note")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value:10.2f} | {note}")
    print(
        f"| {'peak RSS, streamed decomposition'.ljust(width)} | {peak_rss:8.2f} GB | after imports {streams[0]['rss_after_import_gb']:.2f} GB; "
        f"triplets kept {streams[0]['kept_gb']:.2f} GB"
    )
    print(
        f"| {'accuracy vs dense SVD (sampled modules)'.ljust(width)} | sigma rel err {dense['sigma_rel_err']:.1e}, min |cos| {dense['min_abs_cos']:.7f}"
    )
    print(
        f"| {'decomposition rate / copy-to-device rate'.ljust(width)} | {ratio_copy:10.2f} | "
        f"target >= 0.5 on GPU{'' if on_gpu else ' (not applicable on CPU)'}"
    )
    for note in notes:
        print(f"  dense {note}")
    print(f"(benchmark wall time {time.perf_counter() - run_start:.1f} s)")
    line = f"decompose_vs_read={ratio_read:.2f} dense_vs_ours={ratio_dense:.0f} peak_rss_gb={peak_rss:.2f}"
    print(line + (f" decompose_vs_h2d_bandwidth={ratio_copy:.2f}" if on_gpu else ""))


if __name__ == "__main__":
    main()
