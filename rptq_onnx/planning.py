"""Cluster plans per layer: KMeans counts and features for R1..R5 (as the reference), the points a preset
leaves unclustered, and R2's amplitude key. ``compile`` and its layer-wise form plan each layer here."""

from __future__ import annotations

import numpy as np

from rptq_onnx import quantize
from rptq_onnx.anatomy import DecoderLayer
from rptq_onnx.clustering import ClusterPlan, group_features, plan_clusters, plan_pair_clusters, range_features
from rptq_onnx.config import CompileConfig
from rptq_onnx.errors import RptqError
from rptq_onnx.observers import ChannelStats
from rptq_onnx.passes.fold_reorder import folded_points


def check_cluster_counts(config: CompileConfig, layers: list[DecoderLayer]) -> None:
    counts = config.clusters.kmeans_k()
    layer = layers[0]
    r2 = (layer.head_dim // 2, "RoPE channel pairs per head") if layer.qk_layout == "bhsd" else \
        (layer.head_dim, "channels per head")
    limits = {"R1": (layer.hidden_size, "hidden channels"), "R2": r2,
              "R3": (layer.head_dim, "channels per head"), "R4": (layer.hidden_size, "hidden channels"),
              "R5": (layer.ffn_dim, "fc1 channels")}
    for point, k in counts.items():
        limit, what = limits[point]
        if k is not None and k > limit:
            raise RptqError(f"--clusters {point}={k} exceeds the model's {limit} {what}; use {point}≤{limit}")


def cluster_counts(layer: DecoderLayer, config: CompileConfig) -> dict[str, int]:
    """KMeans k per point (per K/V head at R2/R3); ``ch`` resolved to one cluster per channel. Counts the
    recipe chose (no ``--clusters``) stop at one cluster per channel where a small model has fewer."""
    k = config.clusters.kmeans_k()
    c, d, f = layer.hidden_size, layer.head_dim, layer.ffn_dim
    rope = layer.qk_layout == "bhsd"
    per_channel = {"R1": c, "R2": d // 2 if rope else d, "R3": d, "R4": c, "R5": f}
    counts = {p: k[p] or n for p, n in per_channel.items()}
    if config.recipe_clusters:
        most = dict(per_channel, R2=d if rope and amplitude_key(layer, config) else per_channel["R2"])
        counts = {p: min(n, most[p]) for p, n in counts.items()}
    return counts


def layer_features(layer: DecoderLayer, stats: dict[tuple[int, str], ChannelStats]) -> dict[str, tuple[np.ndarray, int]]:
    """Per point: (KMeans features [channels, F], heads it is clustered per), as the reference.

    R2 and R3 are per K/V head (per head without GQA): features of the query heads that share a
    K/V head sit side by side.
    """
    i, kv, group = layer.index, layer.num_kv_heads, layer.group

    def rng(tap):
        return stats[(i, tap)].minmax.range()

    def grouped(tap):  # a query-head tensor's (max, min) as per-K/V-head features [kv·D, group] each
        hi, lo = rng(tap)
        return group_features(hi, kv, group), group_features(lo, kv, group)

    q_hi, q_lo = grouped("q_attn")
    k_hi, k_lo = rng("k_attn")
    r2 = np.concatenate([q_hi, k_hi[:, None], q_lo, k_lo[:, None]], axis=1)  # [q max…, k max, q min…, k min]
    return {"R1": (range_features(rng("attn_ln")), 1), "R2": (r2, kv),
            "R3": (np.concatenate(grouped("out_in"), axis=1), kv),
            "R4": (range_features(rng("ffn_ln")), 1), "R5": (range_features(rng("fc2_in")), 1)}


def plan_point(layer: DecoderLayer, point: str, features: np.ndarray, heads: int, k: int) -> ClusterPlan:
    """One point's plan; with RoPE (Llama), R2 clusters channel pairs (i, i + D/2)."""
    rope = point == "R2" and layer.qk_layout == "bhsd"
    return (plan_pair_clusters if rope else plan_clusters)(features, k, heads=heads, where=f"layer {layer.index} {point}")


def unclustered_points(config: CompileConfig) -> frozenset[str]:
    """Points left unclustered: no activation there is quantized and the layout does not reorder them.

    KV-only presets quantize only K (R2) and V (R3). With the zero-copy layout R1 and R4 stay in
    their order (their plans would only label Q/DQ points that do not exist here), and R5's
    reorder would only permute fc1/fc2 rows and columns: the same function (with GPTQ, fc2 in
    another column order, no better in principle). The contiguous layout reorders R1/R4 by
    definition, so there every point is clustered.
    """
    q = config.quant
    if q.kv_only and q.quantizes_activations and config.layout == "zero-copy":
        return frozenset({"R1", "R4", "R5"})
    return frozenset()


def plan_layer(layer: DecoderLayer, stats: dict[tuple[int, str], ChannelStats], config: CompileConfig) -> dict[str, ClusterPlan]:
    """KMeans plans for R1..R5 of one layer from its min/max statistics (as the reference); the
    points of ``unclustered_points`` get ``ClusterPlan.identity``."""
    k, skip = cluster_counts(layer, config), unclustered_points(config)
    features = layer_features(layer, stats)
    plans = {}
    for p, (feats, heads) in features.items():
        if p in skip:
            plans[p] = ClusterPlan.identity(len(feats))
        elif p == "R2" and amplitude_key(layer, config):
            k_hi, k_lo = stats[(layer.index, "k_attn")].minmax.range()
            plans[p] = plan_clusters(np.maximum(np.abs(k_hi), np.abs(k_lo))[:, None], k[p], heads=heads,
                                     where=f"layer {layer.index} R2")
        else:
            plans[p] = plan_point(layer, p, feats, heads, k[p])
    return plans


def amplitude_key(layer: DecoderLayer, config: CompileConfig) -> bool:
    """R2 clustered on K's amplitude max(|max|, |min|), freely (not in the paper recipe): K's grid is symmetric (fused attention,
    K after RoPE: GQA's cache has no zero point) and the layout folds nothing of R2, so RoPE pairs
    need not stay together."""
    return config.recipe != "paper" and quantize.symmetric_key(layer, config) and \
        "R2" not in folded_points(layer, config.layout, quantize.keeps_source_grid(config))
