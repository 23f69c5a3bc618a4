"""Pass: calibration taps — per-sample, per-channel max/min reductions as extra graph outputs.

For every layer and tapped tensor it adds ``ReduceMax``/``ReduceMin`` over the token axes so
that only [batch, channels] rows leave the graph (never [batch, seq, channels]). The original
outputs (logits, present K/V) are dropped and dead nodes pruned, which cuts the LM head away:
calibration then costs about as much memory as plain inference without logits.

Tapped tensors per layer (``vocabulary.TAPS``):

    attn_ln  R1  attention-norm output               [B, S, C]
    q_attn   R2  QKᵀ input q (OPT: after scaling)    [B, H, S, D]   (as the reference clusters)
    k_attn   R2  QKᵀ input kᵀ                        [B, H, D, T]
    q, k, v      q_proj/k_proj/v_proj outputs        [B, S, C]      (quantization ranges)
    out_in   R3  out_proj input                      [B, S, C]
    ffn_ln   R4  final-norm output                   [B·S, C] (OPT) or [B, S, C]
    fc2_in   R5  fc2 / down_proj input               [B·S, C] (OPT) or [B, S, C]

For Llama the quantized q and k *are* the QKᵀ inputs (after RoPE; k before its GQA repeat, so
K/V-head channels): ``q`` / ``k`` are tapped once there, [B, H, S, D], and ``q_attn`` /
``k_attn`` name the same statistics (``Tap.aliases``).

With ``sample_taps`` (names from ``SAMPLED_TAPS``) it also adds, for each of those taps, every
``sample_every``-th token's channels as [B, S/k, C] (``.sample``): the values a range search
(rptq_onnx/range_search.py) fits its clipping on.

With ``skip_first`` (names from ``FIRST_TOKEN_TAPS``) those taps leave out the first token of each window
(the attention sink, kept in float there under ``--first-token float``: passes/emit_qdq.py): their
max/min and samples cover positions 1…S−1.

With ``hessians=True`` it also adds, for the input of each linear group (``vocabulary.HESSIAN_TAPS``),
``Xᵀ·X`` over all tokens of the batch ([C, C]): GPTQ's Hessian, summed by the caller.
Outputs are named ``rptq.tap.L{layer}.{tap}.{max|min|xtx}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.anatomy import DecoderLayer
from rptq_onnx.graph import GraphIndex, keep_initializers
from rptq_onnx.observers import SAMPLE_EVERY
from rptq_onnx.passes.base import Pass, PassResult, copy_model
from rptq_onnx.vocabulary import HESSIAN_TAPS, TAP_PREFIX


SAMPLED_TAPS = ("attn_ln", "q", "k", "v", "out_in", "ffn_ln", "fc2_in")  # the taps quantized as Q/DQ points
# the points whose first token stays in float under --first-token float: token-major [B, S, C] / [B·S, C] tensors
# on the residual side of attention and MLP (K, V and P stay quantized: the cache and the attention kernel)
FIRST_TOKEN_TAPS = ("attn_ln", "out_in", "ffn_ln", "fc2_in")
_ALL = 2 ** 62  # Slice's "to the end"


@dataclass(frozen=True)
class Tap:
    layer: int
    name: str
    tensor: str
    layout: str  # "bsc", "flat" ([B·S, C] or [B, S, C]), "bhsd" (reduce axis 2), "bhdt" (reduce axis 3)
    channels: int
    aliases: tuple[str, ...] = ()  # other tap names for the same statistics

    def output(self, stat: str) -> str:
        return f"{TAP_PREFIX}L{self.layer}.{self.name}.{stat}"


def plan_taps(layers: list[DecoderLayer], model: onnx.ModelProto) -> list[Tap]:
    index = GraphIndex(model)
    taps = []
    for layer in layers:
        i, c, f = layer.index, layer.hidden_size, layer.ffn_dim
        qc, kc, vc = layer.q_proj.out_features, layer.k_proj.out_features, layer.v_proj.out_features
        if layer.qk_layout == "bhsd":
            qk = [Tap(i, "q", layer.query, "bhsd", qc, aliases=("q_attn",)),
                  Tap(i, "k", layer.key, "bhsd", kc, aliases=("k_attn",))]
        else:
            qk_node = index.node_by_name[layer.qk_matmul]
            qk = [Tap(i, "q_attn", qk_node.input[0], "bhsd", qc), Tap(i, "k_attn", qk_node.input[1], "bhdt", kc),
                  Tap(i, "q", layer.query, "bsc", qc), Tap(i, "k", layer.key, "bsc", kc)]
        taps += [
            Tap(i, "attn_ln", layer.attn_norm.output, "bsc", c),
            *qk,
            Tap(i, "v", layer.v_proj.output, "bsc", vc),
            Tap(i, "out_in", layer.attn_output, "bsc", layer.out_proj.in_features),
            Tap(i, "ffn_ln", layer.final_norm.output, "flat", c),
            Tap(i, "fc2_in", layer.mlp_hidden, "flat", f),
        ]
    return taps


@dataclass
class TapReport:
    taps: list[Tap]  # in the order of their graph outputs


class InsertTaps(Pass[TapReport]):
    """A new model whose outputs are the taps' per-sample max/min rows (and XᵀX sums); functional."""

    name = "insert_taps"
    in_place = False  # calibration taps a skeleton that compile goes on to fold

    def __init__(self, layers: list[DecoderLayer], batch_source: str = "input_ids", hessians: bool = False,
                 sample_taps: frozenset[str] = frozenset(), sample_every: int = SAMPLE_EVERY,
                 skip_first: frozenset[str] = frozenset(), keep: tuple[str, ...] = ()):
        self.layers, self.batch_source, self.hessians = layers, batch_source, hessians
        self.sample_taps, self.sample_every, self.skip_first = sample_taps, sample_every, skip_first
        self.keep = keep  # graph tensors also kept as outputs (the LM head's input, for a 4-bit head's GPTQ)

    def requires(self, model: onnx.ModelProto) -> str | None:
        if self.batch_source not in {i.name for i in model.graph.input}:
            return f"the graph has no input {self.batch_source} to read the batch size from"
        return None

    def apply(self, model: onnx.ModelProto) -> PassResult[TapReport]:
        taps = plan_taps(self.layers, model)
        out = copy_model(model)
        g = out.graph
        nodes, inits = [], []

        def const(name: str, value) -> str:
            inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
            return name

        const(f"{TAP_PREFIX}axes1", [1])
        const(f"{TAP_PREFIX}axes2", [2])
        const(f"{TAP_PREFIX}axes3", [3])
        const(f"{TAP_PREFIX}flat2", [0, -1])
        const(f"{TAP_PREFIX}tokens3", [0, 0, -1])
        for name, value in (("zero", [0]), ("one", [1]), ("all", [_ALL]), ("every", [self.sample_every])):
            const(f"{TAP_PREFIX}{name}", value)
        batch = f"{TAP_PREFIX}batch"
        nodes.append(helper.make_node("Shape", [self.batch_source], [batch], start=0, end=1, name=batch))
        del g.output[:]
        g.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in self.keep)
        for tap in taps:
            src, axes = tap.tensor, f"{TAP_PREFIX}axes1"
            prefix = f"{TAP_PREFIX}L{tap.layer}.{tap.name}"
            if tap.layout == "flat":  # [B·S, C] (or already [B, S, C]) → [B, S, C]
                shape = f"{prefix}.shape"
                tail = const(f"{prefix}.tail", [-1, tap.channels])
                nodes.append(helper.make_node("Concat", [batch, tail], [shape], axis=0, name=shape))
                nodes.append(helper.make_node("Reshape", [src, shape], [f"{prefix}.bsc"], name=f"{prefix}.bsc"))
                src = f"{prefix}.bsc"
            elif tap.layout in ("bhsd", "bhdt"):
                axes = f"{TAP_PREFIX}axes2" if tap.layout == "bhsd" else f"{TAP_PREFIX}axes3"
            if tap.name in self.skip_first and tap.layout in ("bsc", "flat"):  # positions 1…S−1 only
                later = f"{prefix}.after_first"
                nodes.append(helper.make_node("Slice", [src, f"{TAP_PREFIX}one", f"{TAP_PREFIX}all", f"{TAP_PREFIX}axes1"],
                                              [later], name=later))
                src = later
            for stat, op in (("max", "ReduceMax"), ("min", "ReduceMin")):
                reduced = tap.output(stat) if tap.layout in ("bsc", "flat") else f"{prefix}.{stat}.bhd"
                nodes.append(helper.make_node(op, [src, axes], [reduced], keepdims=0, name=reduced))
                if tap.layout in ("bhsd", "bhdt"):  # [B, H, D] → [B, H·D] (channel h·D + d)
                    nodes.append(helper.make_node("Reshape", [reduced, f"{TAP_PREFIX}flat2"], [tap.output(stat)],
                                                  name=tap.output(stat)))
                g.output.append(helper.make_tensor_value_info(tap.output(stat), onnx.TensorProto.FLOAT, None))
            if tap.name in self.sample_taps and tap.layout != "bhdt":
                nodes += _sample(tap, src, prefix)
                g.output.append(helper.make_tensor_value_info(tap.output("sample"), onnx.TensorProto.FLOAT, None))
            if self.hessians and tap.name in HESSIAN_TAPS:
                flat = const(f"{prefix}.flat", [-1, tap.channels])
                nodes += [helper.make_node("Reshape", [tap.tensor, flat], [f"{prefix}.x2d"], name=f"{prefix}.x2d"),
                          helper.make_node("Transpose", [f"{prefix}.x2d"], [f"{prefix}.xt"], perm=[1, 0], name=f"{prefix}.xt"),
                          helper.make_node("MatMul", [f"{prefix}.xt", f"{prefix}.x2d"], [tap.output("xtx")],
                                           name=tap.output("xtx"))]
                g.output.append(helper.make_tensor_value_info(tap.output("xtx"), onnx.TensorProto.FLOAT, None))
        g.node.extend(nodes)
        g.initializer.extend(inits)
        _prune(out)
        return PassResult(out, TapReport(taps))


def insert_taps(model: onnx.ModelProto, layers: list[DecoderLayer], batch_source: str = "input_ids",
                hessians: bool = False, sample_taps: frozenset[str] = frozenset(),
                sample_every: int = SAMPLE_EVERY, skip_first: frozenset[str] = frozenset(), keep: tuple[str, ...] = ()
                ) -> tuple[onnx.ModelProto, list[Tap]]:
    """A new model whose outputs are the taps' per-sample max/min rows (and XᵀX sums, token samples), and the
    tensors named in ``keep``. ``model`` is not modified."""
    result = InsertTaps(layers, batch_source, hessians, sample_taps, sample_every, skip_first, keep).run(model)
    return result.model, result.report.taps


def _sample(tap: Tap, src: str, prefix: str) -> list[onnx.NodeProto]:
    """Every k-th token of ``src`` ([B, S, C], or [B, H, S, D] for "bhsd") as [B, S/k, C] (channel h·D + d)."""
    axis = f"{TAP_PREFIX}axes2" if tap.layout == "bhsd" else f"{TAP_PREFIX}axes1"
    picked = tap.output("sample") if tap.layout != "bhsd" else f"{prefix}.picked"
    nodes = [helper.make_node("Slice", [src, f"{TAP_PREFIX}zero", f"{TAP_PREFIX}all", axis, f"{TAP_PREFIX}every"],
                              [picked], name=picked)]
    if tap.layout == "bhsd":
        nodes += [helper.make_node("Transpose", [picked], [f"{prefix}.bshd"], perm=[0, 2, 1, 3], name=f"{prefix}.bshd"),
                  helper.make_node("Reshape", [f"{prefix}.bshd", f"{TAP_PREFIX}tokens3"], [tap.output("sample")],
                                   name=tap.output("sample"))]
    return nodes


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers that no graph output depends on (the LM head, present K/V)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(t for t in node.input if t)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    keep_initializers(g, needed)
