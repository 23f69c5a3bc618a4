"""Time the clustering stage alone: the direct sklearn fits (as before) vs ``rptq_onnx.clustering``.

For every layer and point R1..R5 both implementations plan the same features, in turn (so load
changes hit both); the table gives their seconds, the total KMeans inertia of their plans and
whether the plans (reorder index and run sizes) are identical.

Features are synthetic by default, with the shapes of SmolLM2-135M (hidden 576, 9 heads / 3 K/V
heads of 64, ffn 1536, RoPE, 30 layers) and opt-1.3b (hidden 2048, 32 heads of 64, ffn 8192,
24 layers); ``--model M.onnx`` takes real ones from a calibration of that model instead.

    python -m tools.bench_clustering [--shape smollm2,opt-1.3b] [--layers N]
    python -m tools.bench_clustering --model runs/smol-onnx/model.onnx --calib sotu-train --nsamples 8
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import numpy as np

from rptq_onnx import clustering
from rptq_onnx.planning import cluster_counts, layer_features, plan_point
from rptq_onnx.config import CompileConfig
from rptq_onnx.observers import ChannelStats
from rptq_onnx.vocabulary import POINTS

# name → (layers, hidden, heads, kv heads, head dim, ffn, RoPE)
SHAPES = {"smollm2": (30, 576, 9, 3, 64, 1536, True), "opt-1.3b": (24, 2048, 32, 32, 64, 8192, False)}


def old_kmeans_labels(data: np.ndarray, k: int) -> np.ndarray:
    """The implementation before tools/bench_clustering.py existed: sklearn with its default threads."""
    from sklearn.cluster import KMeans

    n = data.shape[0]
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n)
    return KMeans(n_clusters=k, n_init=10, random_state=0).fit(data).labels_


def synthetic_model(name: str, layers: int | None, seed: int = 0):
    """(layer stand-ins, stats) with LLM-like ranges: log-normal magnitudes, asymmetric min/max,
    a few outlier channels 10-50× larger (fixed per channel across the residual points)."""
    n, c, h, kv, d, f, rope = SHAPES[name]
    n = min(layers or n, n)
    rng = np.random.default_rng(seed)
    outliers = rng.choice(c, size=max(2, c // 200), replace=False)
    sizes = {"attn_ln": c, "q_attn": h * d, "k_attn": kv * d, "out_in": h * d, "ffn_ln": c, "fc2_in": f}
    stats, layer_list = {}, []
    for i in range(n):
        layer_list.append(SimpleNamespace(index=i, hidden_size=c, head_dim=d, ffn_dim=f, num_heads=h, num_kv_heads=kv,
                                          group=h // kv, qk_layout="bhsd" if rope else "bsc"))
        for tap, size in sizes.items():
            hi = rng.lognormal(0.0, 0.6, size)
            if size == c:
                hi[outliers] *= rng.uniform(10, 50, len(outliers))
            lo = -hi * rng.uniform(0.5, 1.5, size)
            st = ChannelStats()
            st.update(hi[None], lo[None])
            stats[(i, tap)] = st
    return layer_list, stats


def calibrated_model(args):
    from tools.bench_common import open_model

    from rptq_onnx.calibrate import calibrate, calibration_windows
    from rptq_onnx.config import CalibConfig
    from rptq_onnx.graph import load_model

    bm = open_model(args)
    windows = calibration_windows(CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen),
                                  bm.path.parent, bm.vocab, bm.max_positions)
    calib = calibrate(load_model(bm.path, load_weights=False), bm.layers, windows, model_dir=bm.path.parent)
    return bm.layers[:args.layers or None], calib.stats


def kmeans_points(features: np.ndarray, heads: int, pairs: bool):
    """The point sets KMeans saw, per head: (data, channels of the head whose labels they carry)."""
    per_head = features.shape[0] // heads
    for h in range(heads):
        block = features[h * per_head:(h + 1) * per_head]
        if pairs:
            half = per_head // 2
            yield np.concatenate([block[:half], block[half:]], axis=1), np.arange(half) + h * per_head
        else:
            yield block, np.arange(per_head) + h * per_head


def inertia(features: np.ndarray, plan, pairs: bool) -> float:
    """Sum of squared distances of every KMeans point to its cluster's mean."""
    labels, total = plan.labels(), 0.0
    for data, channels in kmeans_points(np.asarray(features, np.float64), plan.heads, pairs):
        lab = labels[channels]
        for c in np.unique(lab):
            part = data[lab == c]
            total += float(((part - part.mean(0)) ** 2).sum())
    return total


def timed_plan(layer, point, feats, heads, k, labels_fn):
    clustering._kmeans_labels, saved = labels_fn, clustering._kmeans_labels
    try:
        t0 = time.perf_counter()
        plan = plan_point(layer, point, feats, heads, k)
        return plan, time.perf_counter() - t0
    finally:
        clustering._kmeans_labels = saved


def bench(layers, stats, config: CompileConfig) -> dict[str, dict]:
    new_fn = clustering._kmeans_labels
    rows = {p: dict(fits=0, old_s=0.0, new_s=0.0, old_inertia=0.0, new_inertia=0.0, same=0, plans=0) for p in POINTS}
    for layer in layers:
        k = cluster_counts(layer, config)
        for point, (feats, heads) in layer_features(layer, stats).items():
            pairs = point == "R2" and layer.qk_layout == "bhsd"
            old, t_old = timed_plan(layer, point, feats, heads, k[point], old_kmeans_labels)
            new, t_new = timed_plan(layer, point, feats, heads, k[point], new_fn)
            r = rows[point]
            r["fits"] += heads
            r["plans"] += 1
            r["old_s"] += t_old
            r["new_s"] += t_new
            r["old_inertia"] += inertia(feats, old, pairs)
            r["new_inertia"] += inertia(feats, new, pairs)
            r["same"] += int(np.array_equal(old.index, new.index) and old.counts == new.counts)
    return rows


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}\n")
    print("| point | KMeans fits | old s | new s | old ÷ new | inertia old | inertia new | identical plans |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    total = {key: sum(r[key] for r in rows.values()) for key in ("fits", "old_s", "new_s", "same", "plans")}
    for p, r in [*rows.items(), ("all", total)]:
        inert = (f"{r['old_inertia']:.6g} | {r['new_inertia']:.6g}" if "old_inertia" in r else " | ")
        print(f"| {p} | {r['fits']} | {r['old_s']:.2f} | {r['new_s']:.2f} | {r['old_s'] / max(r['new_s'], 1e-9):.1f} | "
              f"{inert} | {r['same']}/{r['plans']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2,opt-1.3b", help=f"synthetic shapes: {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers (default: all)")
    parser.add_argument("--model", default=None, help="an exported model.onnx: real features from its calibration")
    parser.add_argument("--calib", default="sotu-train", help="with --model: calibration text (default sotu-train)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_info

    pools = ", ".join(f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info())
    print(f"{os.cpu_count()} CPUs; thread pools: {pools}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    config = CompileConfig()
    if args.model:
        from pathlib import Path

        args.model, args.workdir = Path(args.model), None
        layers, stats = calibrated_model(args)
        print_table(f"{args.model}, {len(layers)} layers, calibrated on {args.calib}", bench(layers, stats, config))
        return
    for name in args.shape.split(","):
        layers, stats = synthetic_model(name, args.layers)
        print_table(f"synthetic {name} shapes, {len(layers)} layers", bench(layers, stats, config))


if __name__ == "__main__":
    main()
