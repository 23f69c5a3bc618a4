"""Where the RPTQ reorder points are: a typed map of every decoder layer in an ONNX graph.

Two families share one record (``DecoderLayer``): pre-LN **OPT** and **Llama** (RMSNorm, RoPE,
grouped-query attention, SwiGLU). Matching is structural, never by tensor or node names (the
dynamo exporter generates names like ``node_MatMul_106``; the TorchScript exporter uses scope
paths). Each attention block is anchored on its ``Softmax``; from there the pattern is walked
through the data path.

OPT:

    x ─ LayerNorm(attn) ─┬─ q_proj ─ (·scale) ─ Reshape ─ Transpose ─┐
                         ├─ k_proj ─ Reshape ─ Transpose ─ [Concat past] ─ Transpose ─ MatMul(QKᵀ) ─ … ─ Softmax
                         └─ v_proj ─ Reshape ─ Transpose ─ [Concat past] ─────────────── MatMul(PV) ─┘
      PV ─ Transpose ─ Reshape ─ out_proj ─ Add(residual) ─ [Reshape] ─ LayerNorm(final)
         ─ fc1 ─ ReLU ─ fc2

Llama (RMSNorm decomposed as Pow → ReduceMean → Add → Sqrt → Reciprocal → Mul → Mul(γ)):

    x ─ RMSNorm(input) ─┬─ q_proj ─ Reshape ─ Transpose ─ RoPE ─┐
                        ├─ k_proj ─ Reshape ─ Transpose ─ RoPE ─ [Concat past] ─ repeat_kv ─ MatMul(QKᵀ) ─ … ─ Softmax
                        └─ v_proj ─ Reshape ─ Transpose ─ [Concat past] ─ repeat_kv ───────── MatMul(PV) ─┘
      PV ─ Transpose ─ Reshape ─ o_proj (out_proj) ─ Add(residual) ─ RMSNorm(post-attention)
         ─┬─ gate_proj (fc1) ─ SiLU ─┐
          └─ up_proj ─────────────── Mul ─ down_proj (fc2)

    RoPE(x) = x·cos + rotate_half(x)·sin,  rotate_half(x) = Concat(−x[..., D/2:], x[..., :D/2])

R-points (README "Reorder points"; ``TAP_POINTS`` below maps every tap and Q/DQ point to one):
    R1  attention-norm output                 (→ rows of q/k/v)
    R2  OPT: q_proj and k_proj outputs;       (one shared permutation, per head; Llama: per K/V
        Llama: q and k after RoPE              head, moving RoPE pairs (i, i + D/2) together)
    R3  out_proj input                        (channels of v, per head; Llama: per K/V head)
    R4  final / post-attention norm output    (→ rows of fc1, or of gate_proj and up_proj)
    R5  fc2 / down_proj input                 (after the activation / the SwiGLU product)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import shape_inference

from rptq_onnx.constants import BLOCK_SUMS_PREFIX, OFFSET_ADD_SUFFIX, POINTS, WEIGHT_PREFIX  # POINTS re-exported: anatomy.POINTS
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex

# Every calibration tap and activation Q/DQ point → (the R-point whose cluster plan it uses, a label).
# q_attn / k_attn are the QKᵀ inputs R2 is clustered on (for Llama the same tensors as q / k);
# P (the softmax output) has no R-point: it takes a fixed 1/255 scale.
TAP_POINTS = {
    "attn_ln": ("R1", "attn-norm out"),
    "q_attn": ("R2", "q at QKᵀ"), "k_attn": ("R2", "k at QKᵀ"),
    "q": ("R2", "q"), "k": ("R2", "k (K cache)"),
    "v": ("R3", "v (V cache)"), "out_in": ("R3", "out_proj in"),
    "ffn_ln": ("R4", "ffn-norm out"),
    "fc2_in": ("R5", "fc2 / down_proj in"),
}


def tap_label(tap: str) -> str:
    """'R2 q', 'R3 out_proj in', …, for tables and plots."""
    if tap == "P":
        return "softmax P"
    point, what = TAP_POINTS[tap]
    return f"{point} {what}"


# the activation Q/DQ points (``rptq.qdq.L{i}.{tap}``) in table order, with their labels
QDQ_LABELS = {tap: tap_label(tap) for tap in ("attn_ln", "q", "k", "v", "out_in", "ffn_ln", "fc2_in", "P")}

# Ops that carry a tensor's values to another layout without mixing channels of different
# tokens; the walks below pass through them. Input 0 is the data input unless listed below.
# Compiled graphs add QuantizeLinear → [Clip] → DequantizeLinear on the data path.
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Clip"}
_DATA_PATH_OPS = {"Reshape", "Transpose", "Cast", "Identity", "Expand", "Unsqueeze", "Squeeze",
                  "Mul", "Div", "Add", "Sub", "Concat", "Dropout", "Flatten", "Slice"} | _QDQ_OPS
_ELEMENTWISE_MULTI = {"Mul", "Div", "Add", "Sub", "Concat"}
_FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                    "PackedMultiHeadAttention", "SparseAttention"}
_ACTIVATIONS = {"Relu", "Gelu", "FastGelu", "Tanh", "Sigmoid", "Erf", "Mul", "Div", "Add", "Cast", "Identity"}
_ACT_PATH = _ACTIVATIONS | _QDQ_OPS


@dataclass(frozen=True)
class Norm:
    """A normalization: its input (the residual stream), output, γ (and β) initializers.

    ``kind`` is ``layernorm`` (one LayerNormalization node) or ``rmsnorm`` (decomposed; ``node``
    is the final Mul by γ). ``data_input`` / ``weight_input`` are the slots of ``node`` that
    carry the data and γ. In a graph compiled with the contiguous layout, ``input`` is still the
    residual stream and ``gather`` names the reorder Gather feeding ``node``'s data slot.
    """

    node: str
    input: str
    output: str
    weight: str
    bias: str | None
    channels: int
    gather: str | None = None
    kind: str = "layernorm"
    data_input: int = 0
    weight_input: int = 1


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one [B, heads, S, head_dim] tensor: x·cos + rotate_half(x)·sin.

    ``cos_mul`` / ``sin_mul`` are the two Mul nodes and ``cos_input`` / ``sin_input`` the slots
    holding the (broadcast [B, 1, S, D]) tables, which a reorder of the head channels must follow.
    """

    input: str
    output: str
    cos_mul: str
    cos_input: int
    sin_mul: str
    sin_input: int

@dataclass(frozen=True)
class Linear:
    """A linear layer: MatMul [in, out] (+ Add bias) or Gemm (transB=1: [out, in]).

    In a compiled graph ``weight`` may be low-bit: ``weight_dq`` then names the
    DequantizeLinear that feeds the MatMul/Gemm (``weight`` is its integer initializer), or
    ``op`` is ``MatMulNBits`` (``weight`` the packed blocks, layout "nbits").
    """

    node: str
    op: str
    input: str
    output: str  # after the bias
    weight: str  # initializer name (Identity chains resolved)
    weight_layout: str  # "in_out" (MatMul, Gemm transB=0) or "out_in" (Gemm transB=1)
    bias: str | None
    bias_node: str | None  # the Add of a MatMul's bias; None for Gemm (bias is input C)
    in_features: int
    out_features: int
    weight_dq: str | None = None


@dataclass(frozen=True)
class DecoderLayer:
    """Everything an RPTQ pass needs to know about one decoder layer (OPT or Llama).

    Llama's linears map onto the OPT roles: o_proj is ``out_proj``, gate_proj ``fc1``,
    down_proj ``fc2``, and ``up_proj`` is set (None for OPT). ``num_kv_heads`` < ``num_heads``
    is grouped-query attention: K/V head g serves query heads g·r … g·r + r − 1 (r = the ratio).
    """

    index: int
    num_heads: int
    head_dim: int
    hidden_size: int
    ffn_dim: int
    attn_norm: Norm
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    qk_matmul: str
    softmax: str
    softmax_output: str
    pv_matmul: str
    out_proj: Linear
    final_norm: Norm  # the norm before the FFN (R4): OPT final_layer_norm, Llama post_attention_layernorm
    fc1: Linear
    activation: str  # the node whose output is R5 (OPT: the ReLU; Llama: the SwiGLU product)
    fc2: Linear
    attn_output: str  # R3: the out_proj input before any Q/DQ (heads merged, channels of v)
    mlp_hidden: str  # R5: the fc2 input before any Q/DQ (after the activation)
    query: str  # R2 q as quantized: OPT q_proj output [B, S, C]; Llama q after RoPE [B, H, S, D]
    key: str  # R2 k as quantized and cached: OPT k_proj output; Llama k after RoPE [B, H_kv, S, D]
    family: str = "opt"
    num_kv_heads: int = 0  # 0: as num_heads
    up_proj: Linear | None = None
    q_rope: Rope | None = None
    k_rope: Rope | None = None
    past_key: str | None = None
    past_value: str | None = None
    present_key: str | None = None
    present_value: str | None = None

    def __post_init__(self):
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)

    @property
    def value(self) -> str:
        """V as quantized and cached: the v_proj output, [B, S, kv_heads·head_dim]."""
        return self.v_proj.output

    @property
    def group(self) -> int:
        """Query heads per K/V head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def qk_layout(self) -> str:
        """Layout of the R2 tensors: ``bsc`` [B, S, H·D] (OPT) or ``bhsd`` [B, H, S, D] (after RoPE)."""
        return "bhsd" if self.q_rope is not None else "bsc"

    def linears(self) -> dict[str, Linear]:
        """Role → linear, in graph order (``up_proj`` only for gated MLPs)."""
        roles = {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "out_proj": self.out_proj,
                 "fc1": self.fc1}
        if self.up_proj is not None:
            roles["up_proj"] = self.up_proj
        roles["fc2"] = self.fc2
        return roles

    def points(self) -> dict[str, tuple[str, ...]]:
        """R-point → the tensor(s) whose channels are clustered there."""
        return {
            "R1": (self.attn_norm.output,),
            "R2": (self.query, self.key),
            "R3": (self.attn_output,),
            "R4": (self.final_norm.output,),
            "R5": (self.mlp_hidden,),
        }

    def point_channels(self) -> dict[str, int]:
        """Channels each point's cluster plan covers (R2 / R3: the K / V channels, per K/V head)."""
        kv = self.num_kv_heads * self.head_dim
        return {"R1": self.hidden_size, "R2": kv, "R3": kv, "R4": self.hidden_size, "R5": self.ffn_dim}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["points"] = {k: list(v) for k, v in self.points().items()}
        d["point_channels"] = self.point_channels()
        return d



@dataclass(frozen=True)
class ModelMap:
    """The layer map plus model-level facts passes need (final norm, LM head, sharing)."""

    layers: tuple[DecoderLayer, ...]
    with_past: bool
    shared_initializers: frozenset[str]

    def is_shared(self, initializer: str) -> bool:
        """True when more than one node reads this initializer: copy it before modifying."""
        return initializer in self.shared_initializers


def find_layers(model: onnx.ModelProto) -> list[DecoderLayer]:
    """The decoder layers (pre-LN OPT or Llama) of ``model`` in order, or a one-line RptqError."""
    return list(map_model(model).layers)



def map_model(model: onnx.ModelProto) -> ModelMap:
    index = GraphIndex(model)
    fused = sorted({n.op_type for n in index.nodes if n.op_type in _FUSED_ATTENTION})
    if fused:
        raise RptqError(f"the graph has fused attention ({', '.join(fused)}), which hides q/k/v and QKᵀ; "
                        "export it without attention fusion (rptq-onnx export)")
    softmaxes = sorted((n for n in index.nodes if n.op_type == "Softmax"), key=lambda n: index.position[id(n)])
    if not softmaxes:
        raise RptqError("not a decoder graph: no attention Softmax found; export an OPT or Llama model with `rptq-onnx export`")
    shapes = _infer_shapes(model)
    layers = [_match_layer(index, shapes, i, sm) for i, sm in enumerate(softmaxes)]
    with_past = all(layer.past_key and layer.present_key for layer in layers)
    shared = frozenset(name for name in index.initializers if len(index.readers_of_initializer(name)) > 1)
    return ModelMap(layers=tuple(layers), with_past=with_past, shared_initializers=shared)


class _Matcher:
    """Walks from one attention Softmax; every failure names the layer and the part missing."""

    def __init__(self, index: GraphIndex, shapes: dict[str, list], layer: int):
        self.g = index
        self.shapes = shapes
        self.layer = layer

    def fail(self, what: str) -> RptqError:
        return RptqError(f"layer {self.layer}: {what}; rptq-onnx supports pre-LN OPT and Llama decoder graphs from "
                         "`rptq-onnx export`")

    def node_input(self, node: onnx.NodeProto, i: int) -> str:
        return node.input[i] if len(node.input) > i else ""

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        if node.op_type in _ELEMENTWISE_MULTI:
            return self.g.dynamic_inputs(node)
        return [node.input[0]] if node.input and node.input[0] else []

    def back_to(self, tensor: str, predicate, max_depth: int = 10) -> tuple[onnx.NodeProto, str] | None:
        """Walk producers along data inputs until ``predicate(node)``; return (node, tensor)."""
        frontier = [(tensor, 0)]
        seen = set()
        while frontier:
            name, depth = frontier.pop(0)
            if name in seen or depth > max_depth:
                continue
            seen.add(name)
            node = self.g.producer.get(name)
            if node is None:
                continue
            if predicate(node):
                return node, name
            if node.op_type in _DATA_PATH_OPS or node.op_type in ("Where", "Max", "Min"):
                frontier.extend((t, depth + 1) for t in self.data_inputs(node))
        return None

    def forward_to(self, tensor: str, predicate, through: set[str], max_depth: int = 10) -> tuple[onnx.NodeProto, int] | None:
        """Walk consumers through ``through`` ops until ``predicate(node)``; return (node, input index)."""
        frontier = [(tensor, 0)]
        seen = set()
        while frontier:
            name, depth = frontier.pop(0)
            if name in seen or depth > max_depth:
                continue
            seen.add(name)
            for node in self.g.consumers.get(name, []):
                if predicate(node):
                    return node, list(node.input).index(name)
                if node.op_type in through:
                    frontier.extend((o, depth + 1) for o in node.output if o)
        return None

    def is_dynamic_matmul(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "MatMul" and len(self.g.dynamic_inputs(node)) == 2

    def weight_source(self, tensor: str) -> tuple[str | None, str | None]:
        """(initializer, DequantizeLinear node) behind a weight input, or (None, None)."""
        src = self.g.constant_source(tensor)
        if src is not None:
            return src, None
        producer = self.g.producer.get(tensor)
        if producer is not None and producer.op_type == "DequantizeLinear" and self.g.is_constant(producer.input[0]):
            return self.g.constant_source(producer.input[0]), producer.name
        return None, None

    def is_linear(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "MatMulNBits":
            return True
        if node.name.startswith(WEIGHT_PREFIX):  # a kept source grid's block sums / offset term, not a layer
            return False
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            src, _ = self.weight_source(node.input[1])
            shape = self.g.constant_shape(src) if src else None
            return shape is not None and len(shape) == 2 and not self.g.is_constant(node.input[0])
        return False

    def linear(self, node: onnx.NodeProto, role: str) -> Linear:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out_t, bias, bias_node = self._bias_output(node)
            return Linear(node=node.name, op=node.op_type, input=node.input[0], output=out_t, weight=node.input[1],
                          weight_layout="nbits", bias=bias, bias_node=bias_node, in_features=int(attrs["K"]),
                          out_features=int(attrs["N"]))
        weight, dq = self.weight_source(node.input[1])
        if weight not in self.g.initializers:
            raise self.fail(f"{role} weight is not an initializer")
        dims = tuple(self.g.initializers[weight].dims)
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                raise self.fail(f"{role} is a Gemm with transA=1")
            layout = "out_in" if attrs.get("transB", 0) else "in_out"
            bias = self.g.constant_source(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            out_t, bias_node = node.output[0], None
        else:
            layout = "in_out"
            out_t, bias, bias_node = self._bias_output(node)
        in_f, out_f = (dims[1], dims[0]) if layout == "out_in" else (dims[0], dims[1])
        return Linear(node=node.name, op=node.op_type, input=node.input[0], output=out_t, weight=weight,
                      weight_layout=layout, bias=bias, bias_node=bias_node, in_features=int(in_f), out_features=int(out_f),
                      weight_dq=dq)

    def _bias_output(self, node: onnx.NodeProto) -> tuple[str, str | None, str | None]:
        """(output after the bias, bias initializer, bias Add node) of a MatMul-like node (after the
        offset term of codes kept from a source grid, passes/quantize_weights.py, where there is one)."""
        out = node.output[0]
        users = self.g.value_readers(out)
        if len(users) == 1 and users[0].op_type == "Add" and users[0].name.endswith(OFFSET_ADD_SUFFIX):
            out = users[0].output[0]
            users = self.g.value_readers(out)
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = [t for t in add.input if t != out]
            src = self.g.constant_source(other[0]) if other else None
            if src is not None and len(self.g.constant_shape(src) or ()) == 1:
                return add.output[0], src, add.name
        return out, None, None

    def before_qdq(self, tensor: str) -> str:
        """The float tensor a Q → [Clip] → DQ chain (if any) fake-quantizes."""
        for _ in range(4):
            producer = self.g.producer.get(tensor)
            if producer is None or producer.op_type not in _QDQ_OPS or self.g.is_constant(producer.input[0]):
                break
            tensor = producer.input[0]
        return tensor

    def readers_through_qdq(self, tensor: str) -> set[str]:
        """Names of the nodes reading ``tensor``, looking through a Q/DQ chain (block sums made for the
        linears reading it, passes/quantize_weights.py, are part of those linears)."""
        names = set()
        for node in self.g.value_readers(tensor):
            if node.name.startswith(BLOCK_SUMS_PREFIX):
                continue
            if node.op_type in _QDQ_OPS:
                names |= self.readers_through_qdq(node.output[0])
            else:
                names.add(node.name)
        return names

    def linear_behind(self, tensor: str, role: str) -> Linear:
        # deep enough for Llama's k in a compiled graph: GQA repeat, cache Concat, head-layout Q/DQ, RoPE
        found = self.back_to(tensor, self.is_linear, max_depth=24)
        if found is None:
            raise self.fail(f"no {role} linear (MatMul/Gemm with a weight initializer) feeds the attention")
        return self.linear(found[0], role)

    def norm(self, node: onnx.NodeProto, role: str) -> Norm:
        weight = self.g.constant_source(self.node_input(node, 1))
        bias = self.g.constant_source(self.node_input(node, 2)) if self.node_input(node, 2) else None
        if weight not in self.g.initializers:
            raise self.fail(f"{role} LayerNorm γ is not an initializer")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1:  # noqa: SIM102
            rank = len(self.shapes.get(node.input[0]) or [])
            if attrs.get("axis") != rank - 1:
                raise self.fail(f"{role} LayerNorm does not normalize the last axis")
        source, gather = node.input[0], None
        producer = self.g.producer.get(source)
        if producer is not None and producer.op_type == "Gather" and self.g.is_constant(producer.input[1]):
            source, gather = producer.input[0], producer.name
        return Norm(node=node.name, input=source, output=node.output[0], weight=weight, bias=bias,
                    channels=int(self.g.initializers[weight].dims[0]), gather=gather)

    def skip_casts(self, tensor: str) -> str:
        """``tensor`` with Cast / Identity producers looked through (TorchScript casts norm inputs)."""
        for _ in range(4):
            producer = self.g.producer.get(tensor)
            if producer is None or producer.op_type not in ("Cast", "Identity"):
                break
            tensor = producer.input[0]
        return tensor

    def rms_norm(self, node: onnx.NodeProto, source: str | None = None) -> Norm | None:
        """The decomposed RMSNorm ending in ``node`` (γ · x · 1/√(mean(x²) + ε)), or None.

        ``node`` must be a Mul of a 1-D γ initializer and x·r, where r comes from ReduceMean(x²)
        of the same x. ``source``: if given, x must be this tensor (after Casts).
        """
        if node.op_type != "Mul" or len(node.input) != 2:
            return None
        slots = [i for i, t in enumerate(node.input) if self.g.is_constant(t)]
        if len(slots) != 1:
            return None
        w_slot = slots[0]
        weight = self.g.constant_source(node.input[w_slot])
        shape = self.g.constant_shape(weight) if weight else None
        if weight not in self.g.initializers or shape is None or len(shape) != 1:
            return None
        d_slot = 1 - w_slot
        normalized, gather = node.input[d_slot], None
        producer = self.g.producer.get(normalized)
        if producer is not None and producer.op_type == "Gather" and self.g.is_constant(producer.input[1]):
            normalized, gather = producer.input[0], producer.name
        scaled = self.g.producer.get(self.skip_casts(normalized))
        if scaled is None or scaled.op_type != "Mul" or len(self.g.dynamic_inputs(scaled)) != 2:
            return None
        for x_slot in (0, 1):
            x = self.skip_casts(scaled.input[x_slot])
            if self._mean_square_of(scaled.input[1 - x_slot], x):
                if source is not None and x != self.skip_casts(source):
                    return None
                return Norm(node=node.name, input=x, output=node.output[0], weight=weight, bias=None,
                            channels=int(shape[0]), gather=gather, kind="rmsnorm", data_input=d_slot,
                            weight_input=w_slot)
        return None

    def _mean_square_of(self, tensor: str, x: str) -> bool:
        """True when ``tensor`` = f(ReduceMean(x²)) through Add(ε) / Sqrt / Reciprocal / Div / Cast."""
        for _ in range(6):
            node = self.g.producer.get(tensor)
            if node is None:
                return False
            if node.op_type == "ReduceMean":
                sq = self.g.producer.get(node.input[0])
                if sq is None:
                    return False
                if sq.op_type == "Pow":
                    return self.skip_casts(sq.input[0]) == x and np.allclose(self.g.constant_value(sq.input[1]), 2)
                return sq.op_type == "Mul" and self.skip_casts(sq.input[0]) == self.skip_casts(sq.input[1]) == x
            if node.op_type not in ("Add", "Sqrt", "Reciprocal", "Div", "Cast", "Identity"):
                return False
            dynamic = self.g.dynamic_inputs(node)
            if len(dynamic) != 1:
                return False
            tensor = dynamic[0]
        return False

    def rope(self, add: onnx.NodeProto) -> Rope | None:
        """The rotary embedding ending in ``add`` (x·cos + Concat(−x[D/2:], x[:D/2])·sin), or None."""
        if add.op_type != "Add" or len(add.input) != 2:
            return None
        muls = [self.g.producer.get(t) for t in add.input]
        if any(m is None or m.op_type != "Mul" for m in muls):
            return None
        for cos_mul, sin_mul in (muls, muls[::-1]):
            for r_slot in (0, 1):
                x = self._rotated_half_of(sin_mul.input[r_slot])
                if x is None or x not in cos_mul.input:
                    continue
                rope = Rope(input=x, output=add.output[0], cos_mul=cos_mul.name,
                            cos_input=1 - list(cos_mul.input).index(x), sin_mul=sin_mul.name, sin_input=1 - r_slot)
                for mul, slot in ((cos_mul, rope.cos_input), (sin_mul, rope.sin_input)):
                    if not self._is_head_broadcast(mul.input[slot]):
                        raise self.fail(f"the rotary table {mul.input[slot]} is not [B, 1, S, D] (cos/sin "
                                        "unsqueezed on axis 1); this RoPE layout is not supported")
                return rope
        return None

    def _is_head_broadcast(self, table: str) -> bool:
        """True when ``table`` = Unsqueeze(axis 1) of [B, S, D]: one row of cos or sin for all heads
        (or, in a compiled graph, that row permuted per head by ``fold_reorder``)."""
        node = self.g.producer.get(self.skip_casts(table))
        if node is not None and node.op_type == "Squeeze" and node.name.startswith("rptq.reorder."):
            return True
        if node is None or node.op_type != "Unsqueeze" or len(node.input) < 2:  # opset ≥ 13: axes is an input
            return False
        axes = self.g.constant_value(node.input[1])
        return axes is not None and np.asarray(axes).ravel().tolist() == [1]

    def _rotated_half_of(self, tensor: str) -> str | None:
        """x when ``tensor`` = Concat(Neg(x[..., D/2:]), x[..., :D/2]) (rotate_half), else None.

        Both slices and the Concat must be on the last axis, and the halves must meet (the split
        point is checked where it is a constant; TorchScript exports compute it from the shape).
        """
        cat = self.g.producer.get(tensor)
        if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
            return None
        if {a.name: onnx.helper.get_attribute_value(a) for a in cat.attribute}.get("axis") not in (-1, 3):
            return None
        neg = self.g.producer.get(cat.input[0])
        second = self.g.producer.get(cat.input[1])
        if neg is None or neg.op_type != "Neg" or second is None or second.op_type != "Slice":
            return None
        first = self.g.producer.get(neg.input[0])
        if first is None or first.op_type != "Slice" or first.input[0] != second.input[0]:
            return None
        if any(self._slice_arg(s, 3) not in (-1, 3) or self._slice_arg(s, 4, default=1) != 1 for s in (first, second)):
            return None  # not a unit-step slice of the last axis
        split, end = self._slice_arg(first, 1), self._slice_arg(second, 2)
        if self._slice_arg(second, 1) != 0 or (split is not None and end is not None and split != end):
            return None  # not [D/2:] and [:D/2]
        return second.input[0]

    def _slice_arg(self, node: onnx.NodeProto, slot: int, default: int | None = None) -> int | None:
        """A Slice's scalar starts/ends/axes/steps input, None when it is computed at run time."""
        if len(node.input) <= slot or not node.input[slot]:
            return default
        value = self.g.constant_value(node.input[slot])
        return int(np.asarray(value).ravel()[0]) if value is not None and np.asarray(value).size == 1 else None

    def rope_behind(self, tensor: str, role: str) -> Rope:
        found = self.back_to(tensor, lambda n: self.rope(n) is not None, max_depth=16)
        if found is None:
            raise self.fail(f"no rotary embedding (x·cos + rotate_half(x)·sin) on {role} before QKᵀ")
        return self.rope(found[0])

    def relu_mlp(self, readers: set[str]) -> tuple[Linear, None, onnx.NodeProto, Linear]:
        """OPT: final LN → fc1 → activation → fc2."""
        fc1_node = self.g.node_by_name.get(next(iter(readers))) if len(readers) == 1 else None
        if fc1_node is None or not self.is_linear(fc1_node):
            raise self.fail("the final LayerNorm output does not feed exactly one linear (fc1)")
        fc1 = self.linear(fc1_node, "fc1")
        act_users = self.g.value_readers(fc1.output)
        if len(act_users) != 1 or act_users[0].op_type not in _ACTIVATIONS:
            raise self.fail("no activation (ReLU) after fc1")
        act = act_users[0]
        hit = self.forward_to(act.output[0], self.is_linear, through=_ACT_PATH, max_depth=6)
        if hit is None or hit[1] != 0:
            raise self.fail("no fc2 linear after the fc1 activation")
        fc2 = self.linear(hit[0], "fc2")
        if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
            raise self.fail("fc1/fc2 shapes do not form an MLP")
        return fc1, None, act, fc2

    def gated_mlp(self, readers: set[str]) -> tuple[Linear, Linear, onnx.NodeProto, Linear]:
        """Llama SwiGLU: norm → gate_proj → SiLU (Sigmoid · x) ┐ × up_proj → down_proj."""
        nodes = [self.g.node_by_name.get(n) for n in sorted(readers)]
        if len(nodes) != 2 or not all(n is not None and self.is_linear(n) for n in nodes):
            raise self.fail("the post-attention RMSNorm output does not feed exactly two linears (gate_proj, up_proj)")
        lins = [self.linear(n, "gate_proj/up_proj") for n in nodes]
        gated = [lin for lin in lins if any(u.op_type == "Sigmoid" for u in self.g.value_readers(lin.output))]
        if len(gated) != 1:
            raise self.fail("no SiLU (x·sigmoid(x)) on exactly one of gate_proj / up_proj")
        gate = gated[0]
        up = next(lin for lin in lins if lin is not gate)
        product = next((n for n in self.g.value_readers(up.output) if n.op_type == "Mul"), None)
        if product is None or self.back_to(product.input[0] if product.input[1] == up.output else product.input[1],
                                           lambda n: n.name == gate.node, max_depth=4) is None:
            raise self.fail("no SwiGLU product SiLU(gate_proj) · up_proj")
        hit = self.forward_to(product.output[0], self.is_linear, through=_QDQ_OPS, max_depth=4)
        if hit is None or hit[1] != 0:
            raise self.fail("no down_proj linear after the SwiGLU product")
        down = self.linear(hit[0], "down_proj")
        if up.out_features != gate.out_features or down.in_features != gate.out_features:
            raise self.fail("gate_proj/up_proj/down_proj shapes do not form an MLP")
        return gate, up, product, down

    def heads(self, qk: onnx.NodeProto, q_channels: int, present: str | None) -> tuple[int, int]:
        """(heads, head_dim) of the query side; ``q_channels`` is q_proj's output size, which need not
        equal the hidden size (Llama configs with an explicit head_dim)."""
        for tensor in (qk.input[1], qk.input[0], present):
            dims = self.shapes.get(tensor) if tensor else None
            if dims and len(dims) == 4:
                h = dims[1]
                d = dims[2] if tensor == qk.input[1] else dims[3]
                if isinstance(d, int) and not isinstance(h, int) and tensor != present and q_channels % d == 0:
                    h = q_channels // d  # a view(..., -1, head_dim) leaves the head count symbolic
                if isinstance(h, int) and isinstance(d, int) and h * d == q_channels:
                    return h, d
        raise self.fail("cannot determine the number of attention heads from the graph's shapes")


def _match_layer(index: GraphIndex, shapes: dict[str, list], layer: int, softmax: onnx.NodeProto) -> DecoderLayer:
    m = _Matcher(index, shapes, layer)
    found = m.back_to(softmax.input[0], m.is_dynamic_matmul, max_depth=6)
    if found is None:
        raise m.fail("no QKᵀ MatMul before the attention Softmax")
    qk = found[0]
    pv_hit = m.forward_to(softmax.output[0], lambda n: m.is_dynamic_matmul(n),
                          through={"Cast", "Identity", "Dropout", "Where"} | _QDQ_OPS)
    if pv_hit is None or pv_hit[1] != 0:
        raise m.fail("no PV MatMul after the attention Softmax")
    pv = pv_hit[0]

    q = m.linear_behind(qk.input[0], "q_proj")
    k = m.linear_behind(qk.input[1], "k_proj")
    v = m.linear_behind(pv.input[1], "v_proj")
    if len({q.node, k.node, v.node}) != 3:
        raise m.fail("q, k and v do not come from three separate linears (fused QKV, as in GPT-2?)")
    if not (q.input == k.input == v.input):
        raise m.fail("q_proj, k_proj and v_proj do not read the same tensor")

    # R1: pre-norm means q/k/v read a LayerNormalization (OPT) or an RMSNorm (Llama) that nothing else reads.
    ln_out = m.before_qdq(q.input)
    ln_node = index.producer.get(ln_out)
    attn_norm = None
    if ln_node is not None and ln_node.op_type == "LayerNormalization":
        attn_norm = m.norm(ln_node, "attention")
    elif ln_node is not None:
        attn_norm = m.rms_norm(ln_node)
    if attn_norm is None:
        what = ln_node.op_type if ln_node is not None else "a graph input"
        raise m.fail(f"q/k/v read {what}, not a LayerNormalization or RMSNorm output (post-LN OPT such as opt-350m, "
                     "do_layer_norm_before=False, is not supported)")
    if m.readers_through_qdq(ln_out) != {q.node, k.node, v.node}:
        raise m.fail("the attention norm output also feeds the residual (post-LN OPT such as opt-350m, "
                     "do_layer_norm_before=False, is not supported)")
    family = "llama" if attn_norm.kind == "rmsnorm" else "opt"

    # R2 with RoPE (Llama): q and k are rotated after the head split; the rotated tensors are quantized
    q_rope = k_rope = None
    query, key = q.output, k.output
    if family == "llama":
        q_rope, k_rope = m.rope_behind(qk.input[0], "q"), m.rope_behind(qk.input[1], "k")
        query, key = q_rope.output, k_rope.output

    # R3: PV → Transpose → Reshape → out_proj
    hit = m.forward_to(pv.output[0], m.is_linear, through={"Transpose", "Reshape", "Cast", "Identity"} | _QDQ_OPS)
    if hit is None or hit[1] != 0:
        raise m.fail("no out_proj linear after the attention")
    out_proj = m.linear(hit[0], "out_proj")

    # residual add, then R4: the final / post-attention norm (through the reshape to 2-D)
    residual = next((n for n in index.consumers.get(out_proj.output, []) if n.op_type == "Add"), None)
    if residual is None or attn_norm.input not in {m.skip_casts(t) for t in _reshape_sources(index, residual)}:
        raise m.fail("no residual Add of the attention output and the attention norm input")
    if family == "opt":
        hit = m.forward_to(residual.output[0], lambda n: n.op_type == "LayerNormalization",
                           through={"Reshape", "Identity", "Flatten", "Cast", "Gather"}, max_depth=3)
        if hit is None:
            raise m.fail("no final LayerNorm after the attention residual (post-LN OPT such as opt-350m is not supported)")
        final_norm = m.norm(hit[0], "final")
    else:
        src = residual.output[0]
        hit = m.forward_to(src, lambda n: m.rms_norm(n, source=src) is not None,
                           through={"Pow", "Mul", "Cast", "Identity", "Gather"}, max_depth=4)
        if hit is None:
            raise m.fail("no post-attention RMSNorm after the attention residual")
        final_norm = m.rms_norm(hit[0], source=src)
    mlp_readers = m.readers_through_qdq(final_norm.output)
    if family == "opt":
        fc1, up, act, fc2 = m.relu_mlp(mlp_readers)
    else:
        fc1, up, act, fc2 = m.gated_mlp(mlp_readers)

    hidden = q.in_features
    present_key = _graph_output_on_path(index, k.output, qk.input[1])
    present_value = _graph_output_on_path(index, v.output, pv.input[1])
    num_heads, head_dim = m.heads(qk, q.out_features, present_key)
    if k.out_features % head_dim or num_heads % (k.out_features // head_dim):
        raise m.fail(f"k_proj has {k.out_features} outputs, not a whole number of K/V heads of {head_dim} "
                     f"dividing the {num_heads} query heads")
    return DecoderLayer(
        index=layer, num_heads=num_heads, head_dim=head_dim, hidden_size=hidden, ffn_dim=fc1.out_features,
        attn_norm=attn_norm, q_proj=q, k_proj=k, v_proj=v, qk_matmul=qk.name, softmax=softmax.name,
        softmax_output=softmax.output[0], pv_matmul=pv.name, out_proj=out_proj, final_norm=final_norm,
        fc1=fc1, activation=act.name, fc2=fc2, attn_output=m.before_qdq(out_proj.input), mlp_hidden=m.before_qdq(fc2.input),
        query=query, key=key, family=family, num_kv_heads=k.out_features // head_dim, up_proj=up,
        q_rope=q_rope, k_rope=k_rope,
        past_key=_past_input(index, present_key), past_value=_past_input(index, present_value),
        present_key=present_key, present_value=present_value)


def _reshape_sources(index: GraphIndex, node: onnx.NodeProto) -> set[str]:
    """Inputs of ``node`` and what they were reshaped from (the residual is [B*S, C] in the MLP)."""
    names = set(node.input)
    for t in list(node.input):
        producer = index.producer.get(t)
        if producer is not None and producer.op_type in ("Reshape", "Identity"):
            names.add(producer.input[0])
    return names


def _graph_output_on_path(index: GraphIndex, start: str, end: str) -> str | None:
    """A graph output (present K/V) produced between ``start`` and ``end`` on the data path."""
    outputs = set(index.graph_outputs)
    name, steps = end, 0
    while name and steps < 8:
        if name in outputs:
            return name
        node = index.producer.get(name)
        if node is None or name == start:
            return None
        if node.op_type == "Concat":
            if any(t in outputs for t in node.output):
                return node.output[0]
            stored = _stored_as_output(index, node.output[0])
            if stored:
                return stored
        name = node.input[0] if node.op_type != "Concat" else next(
            (t for t in node.input if t not in index.graph_inputs), "")
        steps += 1
    return None


# how a low-bit cache is stored (passes/quantize_kv_cache.py): Transpose → Reshape → QuantizeLinear
_STORE_OPS = ("Transpose", "Reshape", "QuantizeLinear")
_LOAD_OPS = ("DequantizeLinear", "Reshape", "Transpose")


def _stored_as_output(index: GraphIndex, tensor: str) -> str | None:
    """The graph output that ``tensor`` (a float cache) is stored to through the low-bit store chain."""
    frontier = [tensor]
    for op in _STORE_OPS:
        frontier = [n.output[0] for t in frontier for n in index.consumers.get(t, []) if n.op_type == op and n.input[0] == t]
    found = [t for t in frontier if t in index.graph_outputs]
    return found[0] if len(found) == 1 else None


def _past_input(index: GraphIndex, present: str | None) -> str | None:
    if present is None:
        return None
    node = index.producer.get(present)
    for _ in range(len(_STORE_OPS)):  # a low-bit cache: back to its float Concat
        if node is None or node.op_type == "Concat":
            break
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return None
    for tensor in node.input:
        for _ in range(5):  # TorchScript routes the past through a one-input Concat; a low-bit past is loaded
            if tensor in index.graph_inputs:
                return tensor
            producer = index.producer.get(tensor)
            if producer is None:
                break
            if producer.op_type in ("Concat", "Identity", "Cast") and len(producer.input) == 1:
                tensor = producer.input[0]
            elif producer.op_type in _LOAD_OPS:
                tensor = producer.input[0]
            else:
                break
    return None


def _infer_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Static shapes by ONNX shape inference (with data propagation), run on a weight-free copy."""
    light = onnx.ModelProto()
    _copy_without_weights(model, light)
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception:
        inferred = light
    shapes: dict[str, list] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return shapes


def _copy_without_weights(model: onnx.ModelProto, dest: onnx.ModelProto) -> None:
    dest.ir_version = model.ir_version
    dest.opset_import.extend(model.opset_import)
    g = dest.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= 64:
            g.initializer.append(init)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
