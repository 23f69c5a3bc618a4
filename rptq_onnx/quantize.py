"""The quantization stage of `compile`: activation Q/DQ points and low-bit weights for a folded graph.

Which tensor gets which bits (the reference's choices):

    R1 attention-norm output, R4 final-norm out  max(8, abits)   clusters R1 / R4
    q, k (OPT: q_proj / k_proj outputs;          abits           clusters R2 (per K/V head, shared)
          Llama: after RoPE, [B, H, S, D])
    v (v_proj output), R3 out_proj input         abits           clusters R3 (per K/V head)
    R5 fc2 / down_proj input                     abits           clusters R5
    softmax output P                             max(8, abits)   fixed scale 1/255 on [0, 1] (the reference),
                                                                 or per row on P / max(row) (--softmax-scale row)
    KV-only presets: only k and v                abits
    with-past graphs: the cache (present/past)   abits, the k / v scales, stored as uint4/uint8

Ranges come from the calibration statistics of the original graph, mapped into the folded
graph's channel order through each point's cluster plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm import tqdm

from rptq_onnx.anatomy import DecoderLayer, Linear
from rptq_onnx.calibrate import Calibration
from rptq_onnx.clustering import ClusterPlan
from rptq_onnx.config import KEEPS_GRID, MIN_GROUP, CompileConfig
from rptq_onnx.compile_report import ActivationQuantization, QuantizationReport, WeightQuantization
from rptq_onnx.observers import observer_for, searched
from rptq_onnx.passes.base import copy_model
from rptq_onnx.passes.emit_qdq import EmitQdq, QuantPoint
from rptq_onnx.passes.fold_reorder import folded_points
from rptq_onnx.passes.quantize_head import head_input
from rptq_onnx.passes.quantize_kv_cache import CacheTensor, QuantizeKvCache
from rptq_onnx.passes.quantize_weights import QuantizeWeights
from rptq_onnx.range_search import searched_range
from rptq_onnx.quant import (QParams, QuantizedWeight, activation_qparams, quantize_gptq, quantize_on_grid, quantize_rtn,
                             symmetric_activation_qparams)
from rptq_onnx.source_grid import integer_zero_points, weight_on_grid
from rptq_onnx.passes.insert_taps import FIRST_TOKEN_TAPS, SAMPLED_TAPS
from rptq_onnx.vocabulary import LINEAR_INPUT_TAP, MLP_LINEARS, QUERY_HEAD_TAPS, TAP_POINT


def tap_plan(layer: DecoderLayer, plan: dict[str, ClusterPlan], tap: str) -> ClusterPlan:
    p = plan[TAP_POINT[tap]]
    return p.expand_heads(layer.group) if tap in QUERY_HEAD_TAPS else p


def folded_order(layer: DecoderLayer, tap: str, plan: dict[str, ClusterPlan], config: CompileConfig) -> tuple[np.ndarray | None, np.ndarray]:
    """(index into original channels or None if unpermuted, cluster label per channel of the folded graph)."""
    p = tap_plan(layer, plan, tap)
    if TAP_POINT[tap] in folded_points(layer, config.layout, keeps_source_grid(config)):
        return p.index, p.folded_labels()
    return None, p.labels()


def channel_range(calib: Calibration, layer: int, tap: str, observer: str, bits: int,
                  kv_cache: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(max, min) per channel of a point quantized to ``bits`` under ``--observer observer`` (``kv_cache``: K or V
    of a KV preset, observers.observer_for)."""
    name, factor = observer_for(observer, bits, kv_cache)
    mx, mn = calib.stats[(layer, tap)].observer(name).range()
    return mx * factor, mn * factor


def sampled_taps(config: CompileConfig) -> frozenset[str]:
    """The taps whose ranges are searched, where calibration keeps a sample of tokens (rptq_onnx/range_search.py)."""
    q = config.quant
    if not (q.quantizes_activations and searched(q.observer)):
        return frozenset()
    return frozenset(("k", "v") if q.kv_only else SAMPLED_TAPS)


def first_token_taps(config: CompileConfig) -> frozenset[str]:
    """The taps whose first token stays in float (``--first-token float``) and out of their ranges."""
    q = config.quant
    if not (q.quantizes_activations and not q.kv_only and q.first_token == "float"):
        return frozenset()
    return frozenset(FIRST_TOKEN_TAPS)


def symmetric_key(layer: DecoderLayer, config: CompileConfig) -> bool:
    """K's grid must be symmetric: fused attention (GQA's cache has no zero point) and K after RoPE,
    where no offset can be folded away (passes/fuse_attention.py)."""
    return config.attention == "fused" and layer.q_rope is not None


def activation_points(layers: list[DecoderLayer], folded_layers: list[DecoderLayer], plans: list[dict[str, ClusterPlan]],
                      calib: Calibration, config: CompileConfig) -> list[QuantPoint]:
    q = config.quant
    if not q.quantizes_activations:
        return []
    points = []
    per_tensor = config.clusters.per_tensor_points()
    first = first_token_taps(config)
    for layer, fl, plan in zip(layers, folded_layers, plans):
        i = layer.index
        heads = {"q": fl.num_heads, "k": fl.num_kv_heads} if fl.qk_layout == "bhsd" else {}
        tensors = {"attn_ln": (fl.attn_norm.output, q.ln_bits), "q": (fl.query, q.abits),
                   "k": (fl.key, q.abits), "v": (fl.value, q.abits),
                   "out_in": (fl.attn_output, q.abits), "ffn_ln": (fl.final_norm.output, q.ln_bits),
                   "fc2_in": (fl.mlp_hidden, q.abits)}
        chosen = ("k", "v") if q.kv_only else tuple(tensors)
        for tap in chosen:
            tensor, bits = tensors[tap]
            index, labels = folded_order(layer, tap, plan, config)
            if TAP_POINT[tap] in per_tensor:
                labels = np.zeros_like(labels)
            mx, mn = channel_range(calib, i, tap, q.observer, bits, kv_cache=q.kv_only)
            sample = calib.stats[(i, tap)].sample if searched(q.observer) else None
            if index is not None:
                mx, mn = mx[index], mn[index]
                sample = None if sample is None else sample[:, index]
            grid = symmetric_activation_qparams if (tap == "k" and symmetric_key(fl, config)) else activation_qparams
            if sample is not None:
                mx, mn = searched_range(sample, mx, mn, labels, bits, grid)
            points.append(QuantPoint(tag=f"L{i}.{tap}", tensor=tensor, qparams=grid(mx, mn, labels, bits),
                                     heads=heads.get(tap, 0), keep_first=tap in first))
        if not q.kv_only:
            p = QParams(scale=np.array([1 / 255], np.float32), zero_point=np.array([0]), bits=8)
            points.append(QuantPoint(tag=f"L{i}.P", tensor=fl.softmax_output, qparams=p, per_tensor=True,
                                     row_max=q.softmax_scale == "row"))
    return points


def _weight_out_in(model_inits: dict[str, onnx.TensorProto], lin: Linear, base_dir: str = "") -> np.ndarray:
    w = numpy_helper.to_array(model_inits[lin.weight], base_dir)  # from external data if not loaded
    return w if lin.weight_layout == "out_in" else w.T


def keeps_source_grid(config: CompileConfig) -> bool:
    """Weights already on a grid keep their codes (``--source-grid keep`` or ``keep-mlp``, resolved by
    ``resolve_source_grid``)."""
    return config.quant.quantizes_weights and config.quant.source_grid in KEEPS_GRID


def keeps_role(config: CompileConfig, role: str) -> bool:
    """Does linear ``role`` keep exact codes from a grid with a float offset per block? ``keep``: every linear;
    ``keep-mlp``: the MLP's (the attention linears take integer zero points instead, docs/genai.md)."""
    return config.quant.source_grid == "keep" or role in MLP_LINEARS


def kept_grid(w: np.ndarray, bits: int) -> QuantizedWeight | None:
    """``w``'s own codes where it sits on a ``bits``-bit grid (rptq_onnx/source_grid.py) and keeping them pays:
    always at ≤ 4 bits (quantizing Q4_1 values again costs SmolLM2 +26 % perplexity), above only without
    a float offset (at 8 bits requantizing costs little, while offsets cost memory: README, *Quantization*)."""
    found = weight_on_grid(w, bits)
    return found if found is not None and (bits <= 4 or found.offset is None) else None


def source_grid_roles(model: onnx.ModelProto, layer: DecoderLayer, bits: int, base_dir: str = "") -> dict[str, bool]:
    """Per linear role of ``layer``: does it keep its source grid (``kept_grid``)?"""
    inits = {t.name: t for t in model.graph.initializer}
    return {role: kept_grid(_weight_out_in(inits, lin, base_dir), bits) is not None
            for role, lin in layer.linears().items()}


def resolve_source_grid(config: CompileConfig, model: onnx.ModelProto, layers: list[DecoderLayer],
                        base_dir: str = "") -> tuple[CompileConfig, dict[str, bool]]:
    """``--source-grid keep`` stays ``keep`` only where it can apply: weights quantized as MatMulNBits in
    the zero-copy layout (which then folds no reorder into a weight's inputs, R3/R5 included, so every
    block keeps its inputs), and the first layer's weights on a ``wbits``-bit grid. Otherwise it
    resolves to ``requantize``. Returns (config, first layer's role → on grid)."""
    q = config.quant
    if q.source_grid not in KEEPS_GRID or not q.quantizes_weights:
        return config, {}
    found = source_grid_roles(model, layers[0], q.wbits, base_dir) if q.matmulnbits and config.layout == "zero-copy" else {}
    if not any(found.values()):
        return dataclasses.replace(config, quant=dataclasses.replace(q, source_grid="requantize")), found
    return config, found


def gptq_head_input(graph: onnx.ModelProto, config: CompileConfig) -> str | None:
    """The LM head's input where calibration gathers its XᵀX: a 4-bit head under GPTQ (``QuantizeHead``)."""
    q = config.quant
    return head_input(graph) if q.head_bits == 4 and q.weight_quant == "gptq" else None


def effective_group(in_features: int, group_size: int | None) -> int | None:
    """The group size used for a linear with ``in_features`` inputs: ``group_size`` halved until it
    divides them (SmolLM2's 576 inputs take groups of 64 under the default 128), or None
    (per output channel) when no power of two ≥ 16 does."""
    g = group_size
    while g and g >= MIN_GROUP:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def quantized_weights(folded: onnx.ModelProto, folded_layers: list[DecoderLayer], plans: list[dict[str, ClusterPlan]],
                      calib: Calibration, config: CompileConfig, progress: bool = False,
                      spend_hessians: bool = False) -> dict[str, tuple[Linear, QuantizedWeight]]:
    """Codes for the linears of every layer (weights and Hessians in folded order): kept from a source
    grid where ``--source-grid keep`` applies (under ``keep-mlp`` the attention linears rounded onto that grid with
    integer zero points, ``keeps_role``), else GPTQ (RTN where calibration gathered no Hessian).
    ``spend_hessians``: each XᵀX sum is used up by its last linear (``calib`` cannot quantize again)."""
    q = config.quant
    inits = {t.name: t for t in folded.graph.initializer}
    out = {}
    todo = [(fl, plan, role, lin) for fl, plan in zip(folded_layers, plans) for role, lin in fl.linears().items()]
    last_use = {(fl.index, LINEAR_INPUT_TAP[role]): lin.node for fl, _, role, lin in todo}
    for fl, plan, role, lin in tqdm(todo, desc=f"weights ({q.weight_quant}, {q.wbits}-bit)", unit="linear",
                                    disable=not progress or None):
        w = _weight_out_in(inits, lin)
        group = effective_group(w.shape[1], q.group_size)
        kept = kept_grid(w, q.wbits) if keeps_source_grid(config) else None
        if kept is not None and kept.offset is not None and not keeps_role(config, role):
            # an attention linear under --source-grid keep-mlp: the source's blocks and steps, each block's zero point
            # rounded to a whole code, its values rounded onto that grid (GPTQ there measured worse: docs/genai.md)
            out[lin.node] = (lin, quantize_on_grid(kept.dequantize(), *integer_zero_points(kept), kept.bits,
                                                   kept.group_size))
            continue
        if kept is not None:  # already quantized: its own codes, exactly (GPTQ would only move them)
            out[lin.node] = (lin, kept)
            continue
        if q.weight_quant == "gptq" and (key := (fl.index, LINEAR_INPUT_TAP[role])) in calib.xtx:
            h = calib.hessian(*key, spend=spend_hessians and last_use[key] == lin.node)  # GPTQ's scratch
            index, _ = folded_order(fl, key[1], plan, config)
            if index is not None:
                h = np.ascontiguousarray(h[np.ix_(index, index)])
            qw = quantize_gptq(w, h, q.wbits, group, overwrite_hessian=True)
        else:
            qw = quantize_rtn(w, q.wbits, group)
        out[lin.node] = (lin, qw)
    return out


def quantize_graph(folded: onnx.ModelProto, layers: list[DecoderLayer], folded_layers: list[DecoderLayer],
                   plans: list[dict[str, ClusterPlan]], calib: Calibration, config: CompileConfig,
                   progress: bool = False, owned: bool = False,
                   spend_hessians: bool = False) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Weights, then activation Q/DQ, then the KV cache, on the folded graph; ``owned``: the passes edit
    ``folded`` itself (else a copy); ``spend_hessians``: see ``quantized_weights``. Returns (model, report)."""
    report = QuantizationReport(name=config.name, quantized=True)
    q = config.quant
    model = folded if owned else copy_model(folded)
    if q.quantizes_weights:
        weights = quantized_weights(model, folded_layers, plans, calib, config, progress, spend_hessians)
        form = "matmulnbits" if q.matmulnbits else "dq"
        counts = QuantizeWeights(weights, form=form, accuracy_level=q.accuracy_level,
                                 offset_form=q.grid_offset).run(model, owned=True).report
        used = sorted({qw.group_size or 0 for _, qw in weights.values()})  # 0: per output channel
        report.weights = WeightQuantization(**dataclasses.asdict(counts), algorithm=q.weight_quant, bits=q.wbits,
                                            group_size=q.group_size, group_sizes_used=used,
                                            source_grid=q.source_grid, accuracy_level=q.accuracy_level,
                                            grid_offset=q.grid_offset)
    points = activation_points(layers, folded_layers, plans, calib, config)
    if points:
        qdq = EmitQdq(points).run(model, owned=True).report
        report.activations = ActivationQuantization(**dataclasses.asdict(qdq), scale_range=[
            float(min(p.qparams.scale.min() for p in points)), float(max(p.qparams.scale.max() for p in points))])
        caches = cache_tensors(folded_layers, points)
        if caches and not q.float_cache and config.attention == "eager":  # fused: the kernel keeps the cache
            report.kv_cache = QuantizeKvCache(caches).run(model, owned=True).report
    return model, report


def cache_tensors(folded_layers: list[DecoderLayer], points: list[QuantPoint]) -> list[CacheTensor]:
    """The past/present pairs of a with-past graph, with the scales of their k / v points."""
    by_tag = {p.tag: p for p in points}
    out = []
    for fl in folded_layers:
        for tap, past, present in (("k", fl.past_key, fl.present_key), ("v", fl.past_value, fl.present_value)):
            point = by_tag.get(f"L{fl.index}.{tap}")
            if past and present and point is not None:
                out.append(CacheTensor(tag=point.tag, past=past, present=present, heads=fl.num_kv_heads,
                                       head_dim=fl.head_dim, qparams=point.qparams))
    return out
