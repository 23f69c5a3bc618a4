"""Pass: per-cluster activation fake quantization as QuantizeLinear → DequantizeLinear pairs.

A cluster's scale/zero point is repeated over its channels, giving a 1-D per-channel Q/DQ on
``axis=-1`` (blocked quantization cannot express unequal clusters). Containers: uint8 for 8
bits, uint4 for 4 bits, and uint8 with a ``Clip(0, 2ⁿ−1)`` between Q and DQ for the other
widths (3, 5–7 bits; ``vocabulary`` says why). Every reader of the tensor is moved to the dequantized value.

A tensor in the attention head layout [B, H, S, D] (Llama's q and k after RoPE) needs one scale
per head *and* channel, but per-axis Q/DQ takes a 1-D scale on one axis. Such a point is
quantized in the channel-major layout the KV cache uses, [B, H·D, S] with axis 1:
Transpose → Reshape → Q → [Clip] → DQ → Reshape → Transpose (the reshapes are named
``rptq.layout.<tag>.*``, so bypassing the ``rptq.qdq.*`` nodes leaves an identity).

A point quantized per row (the softmax output P under ``--softmax-scale row``) is divided by its
row's maximum before Q/DQ and multiplied by it after: ReduceMax → Div → Q → DQ → Mul, also named
``rptq.layout.<tag>.*``. For P that quantizes exp(s − max s) at the fixed step 1/255 and normalizes
after, as int8 flash-attention kernels do: a row's step is its largest probability / 255, finer than
1/255 wherever no key takes all the weight.

A point that keeps the first token (``--first-token float``: the attention sink, whose massive activations
calibration leaves out of the point's ranges) passes that token through in float: out = dq + m·(x − dq),
m = 1 at each sequence's first position (from ``attention_mask``: left padding and a cache are counted)
and 0 elsewhere, named ``rptq.layout.<tag>.first.*`` around one shared ``rptq.layout.first_token.mask``.

On ONNX Runtime's CPU and CUDA providers this is *simulated* quantization: the values are
rounded to the low-bit grid, but the following MatMul still runs in float.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.graph import GraphIndex, insert_nodes, rename_inputs
from rptq_onnx.passes.base import Pass, PassResult
from rptq_onnx.quant import QParams
from rptq_onnx.vocabulary import LAYOUT_PREFIX, QDQ_PREFIX, activation_container


@dataclass(frozen=True)
class QuantPoint:
    """Fake-quantize ``tensor`` with ``qparams``; ``tag`` names the nodes (e.g. ``L3.R1``)."""

    tag: str
    tensor: str
    qparams: QParams
    per_tensor: bool = False  # a scalar scale/zero point (the softmax output's fixed 1/255)
    heads: int = 0  # > 0: ``tensor`` is [B, heads, S, D]; qparams has one entry per head·D + d
    row_max: bool = False  # divide by each row's maximum (last axis) before Q/DQ, multiply after
    keep_first: bool = False  # ``tensor`` is token-major ([B, S, C] or [B·S, C]); each sequence's first token stays float

    def dequantized(self) -> str:
        return f"{QDQ_PREFIX}{self.tag}.dq"


@dataclass
class QdqReport:
    points: int = 0
    by_bits: dict[str, int] = field(default_factory=dict)  # bit width (as a string) → points


class EmitQdq(Pass[QdqReport]):
    """A Q/DQ pair at every point (edits in place)."""

    name = "emit_qdq"

    def __init__(self, points: list[QuantPoint]):
        self.points = points

    def requires(self, model: onnx.ModelProto) -> str | None:
        inputs = {i.name for i in model.graph.input}
        if any(p.keep_first for p in self.points) and not {"input_ids", "attention_mask"} <= inputs:
            return "--first-token float needs the graph inputs input_ids and attention_mask; use --first-token quantized"
        outputs = {o.name for o in model.graph.output}
        bad = next((p for p in self.points if p.tensor in outputs), None)
        return f"{bad.tensor} is a graph output; quantize it in the KV-cache pass instead" if bad else None

    def apply(self, model: onnx.ModelProto) -> PassResult[QdqReport]:
        g = model.graph
        if any(p.keep_first for p in self.points) and not any(FIRST_MASK in n.output for n in g.node):
            nodes = _first_token_mask(g) + list(g.node)  # reads graph inputs only: ahead of everything
            del g.node[:]
            g.node.extend(nodes)
        index = GraphIndex(model)
        readers = {p.tensor: list(index.consumers.get(p.tensor, [])) for p in self.points}
        new_nodes: dict[str, list[onnx.NodeProto]] = {}
        report = QdqReport()
        for p in self.points:
            new_nodes[p.tensor], dq_out = _emit_point(g, p)
            rename_inputs(readers[p.tensor], {p.tensor: dq_out})
            report.points += 1
            report.by_bits[str(p.qparams.bits)] = report.by_bits.get(str(p.qparams.bits), 0) + 1
        insert_nodes(g, new_nodes)  # each Q/DQ group right after the producer of its tensor
        return PassResult(model, report, modified=bool(self.points))


def emit_qdq(model: onnx.ModelProto, points: list[QuantPoint]) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with a Q/DQ pair at every point; returns (model, report)."""
    result = EmitQdq(points).run(model)
    return result.model, dataclasses.asdict(result.report)


def _emit_point(g: onnx.GraphProto, p: QuantPoint) -> tuple[list[onnx.NodeProto], str]:
    """Adds ``p``'s initializers to ``g``; returns its nodes and the tensor its readers now read."""
    elem, clip = activation_container(p.qparams.bits)
    prefix = f"{QDQ_PREFIX}{p.tag}"
    scale = p.qparams.scale.astype(np.float32)
    zp = p.qparams.zero_point
    if p.per_tensor:
        scale, zp = scale[:1].reshape(()), zp[:1].reshape(())
    g.initializer.append(numpy_helper.from_array(scale, f"{prefix}.scale"))
    g.initializer.append(helper.make_tensor(f"{prefix}.zero_point", elem, list(np.shape(zp)),
                                            np.asarray(zp).astype(np.int64).ravel().tolist()))
    axis = {} if p.per_tensor else {"axis": 1 if p.heads else -1}
    source, nodes, dq_out = p.tensor, [], p.dequantized()
    if p.heads:
        source, dq_out = f"{LAYOUT_PREFIX}{p.tag}.channels", f"{LAYOUT_PREFIX}{p.tag}.back"
        nodes += _to_channels(g, p, source)
    if p.row_max:
        source, dq_out = f"{LAYOUT_PREFIX}{p.tag}.relative", f"{LAYOUT_PREFIX}{p.tag}.back"
        nodes += _to_row_max(g, p, source)
    q_out = f"{prefix}.q"
    nodes.append(helper.make_node("QuantizeLinear", [source, f"{prefix}.scale", f"{prefix}.zero_point"], [q_out],
                                  name=f"{prefix}.quantize", **axis))
    if clip:
        g.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), f"{prefix}.lo"))
        g.initializer.append(numpy_helper.from_array(np.array(p.qparams.qmax, np.uint8), f"{prefix}.hi"))
        nodes.append(helper.make_node("Clip", [q_out, f"{prefix}.lo", f"{prefix}.hi"], [f"{prefix}.qc"],
                                      name=f"{prefix}.clip"))
        q_out = f"{prefix}.qc"
    nodes.append(helper.make_node("DequantizeLinear", [q_out, f"{prefix}.scale", f"{prefix}.zero_point"],
                                  [p.dequantized()], name=f"{prefix}.dequantize", **axis))
    if p.heads:
        nodes += _from_channels(g, p, dq_out)
    if p.row_max:
        t = f"{LAYOUT_PREFIX}{p.tag}"
        nodes.append(helper.make_node("Mul", [p.dequantized(), f"{t}.row_max"], [dq_out], name=f"{t}.rescale"))
    if p.keep_first:
        nodes += _keep_first(g, p, dq_out)
        dq_out = f"{LAYOUT_PREFIX}{p.tag}.first.out"
    return nodes, dq_out


FIRST_MASK = f"{LAYOUT_PREFIX}first_token.mask"  # [B, S] float: 1 at each sequence's first token


def _first_token_mask(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """[B, S] float, 1 where the position (counted by ``attention_mask`` over past and new tokens) is 0."""
    t = f"{LAYOUT_PREFIX}first_token"
    for name, value in (("one", np.int64(1)), ("zero", np.int64(0)), ("axis", np.int64(1)),
                        ("end", np.array([2 ** 62], np.int64)), ("axes", np.array([1], np.int64))):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), f"{t}.{name}"))
    return [helper.make_node("Cast", ["attention_mask"], [f"{t}.attention_mask"], to=onnx.TensorProto.INT64,
                             name=f"{t}.attention_mask"),  # int32 in some exports
            helper.make_node("CumSum", [f"{t}.attention_mask", f"{t}.axis"], [f"{t}.seen"], name=f"{t}.seen"),
            helper.make_node("Sub", [f"{t}.seen", f"{t}.one"], [f"{t}.position"], name=f"{t}.position"),
            helper.make_node("Shape", ["input_ids"], [f"{t}.new"], start=1, end=2, name=f"{t}.new"),
            helper.make_node("Neg", [f"{t}.new"], [f"{t}.start"], name=f"{t}.start"),
            helper.make_node("Slice", [f"{t}.position", f"{t}.start", f"{t}.end", f"{t}.axes"], [f"{t}.new_positions"],
                             name=f"{t}.new_positions"),
            helper.make_node("Equal", [f"{t}.new_positions", f"{t}.zero"], [f"{t}.is_first"], name=f"{t}.is_first"),
            helper.make_node("Cast", [f"{t}.is_first"], [FIRST_MASK], to=onnx.TensorProto.FLOAT, name=FIRST_MASK)]


def _keep_first(g: onnx.GraphProto, p: QuantPoint, dq: str) -> list[onnx.NodeProto]:
    """dq + m·(x − dq): ``p.tensor`` where the shared mask is 1, ``dq`` elsewhere; m reshaped to x's shape[:-1] + [1]."""
    t = f"{LAYOUT_PREFIX}{p.tag}.first"
    g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{t}.zero"))
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{t}.last"))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{t}.one"))
    return [helper.make_node("Shape", [p.tensor], [f"{t}.shape"], name=f"{t}.shape"),
            helper.make_node("Slice", [f"{t}.shape", f"{t}.zero", f"{t}.last"], [f"{t}.lead"], name=f"{t}.lead"),
            helper.make_node("Concat", [f"{t}.lead", f"{t}.one"], [f"{t}.mask_shape"], axis=0, name=f"{t}.mask_shape"),
            helper.make_node("Reshape", [FIRST_MASK, f"{t}.mask_shape"], [f"{t}.mask"], name=f"{t}.mask"),
            helper.make_node("Sub", [p.tensor, dq], [f"{t}.error"], name=f"{t}.error"),
            helper.make_node("Mul", [f"{t}.error", f"{t}.mask"], [f"{t}.kept"], name=f"{t}.kept"),
            helper.make_node("Add", [dq, f"{t}.kept"], [f"{t}.out"], name=f"{t}.out")]


def _to_row_max(g: onnx.GraphProto, p: QuantPoint, out: str) -> list[onnx.NodeProto]:
    """``tensor`` / its maximum along the last axis (kept as ``rptq.layout.<tag>.row_max`` for the way back)."""
    t = f"{LAYOUT_PREFIX}{p.tag}"
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{t}.last_axis"))
    return [helper.make_node("ReduceMax", [p.tensor, f"{t}.last_axis"], [f"{t}.row_max"], keepdims=1,
                             name=f"{t}.reduce_max"),
            helper.make_node("Div", [p.tensor, f"{t}.row_max"], [out], name=f"{t}.divide")]


def _to_channels(g: onnx.GraphProto, p: QuantPoint, out: str) -> list[onnx.NodeProto]:
    """[B, H, S, D] → [B, H·D, S] (channel h·D + d on axis 1)."""
    t = f"{LAYOUT_PREFIX}{p.tag}"
    g.initializer.append(numpy_helper.from_array(np.array([0, p.qparams.scale.size, -1], np.int64), f"{t}.flat_shape"))
    return [helper.make_node("Transpose", [p.tensor], [f"{t}.bhds"], perm=[0, 1, 3, 2], name=f"{t}.transpose_in"),
            helper.make_node("Reshape", [f"{t}.bhds", f"{t}.flat_shape"], [out], name=f"{t}.reshape_in")]


def _from_channels(g: onnx.GraphProto, p: QuantPoint, out: str) -> list[onnx.NodeProto]:
    """[B, H·D, S] → [B, H, S, D], the inverse of ``_to_channels``."""
    t = f"{LAYOUT_PREFIX}{p.tag}"
    head_dim = p.qparams.scale.size // p.heads
    g.initializer.append(numpy_helper.from_array(np.array([0, p.heads, head_dim, -1], np.int64), f"{t}.heads_shape"))
    return [helper.make_node("Reshape", [p.dequantized(), f"{t}.heads_shape"], [f"{t}.bhds_dq"], name=f"{t}.reshape_out"),
            helper.make_node("Transpose", [f"{t}.bhds_dq"], [out], perm=[0, 1, 3, 2], name=f"{t}.transpose_out")]
