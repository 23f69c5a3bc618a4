"""Llama's decoder layer: decomposed RMSNorm, RoPE on q and k, grouped-query attention, SwiGLU MLP.

Llama (RMSNorm decomposed as Pow → ReduceMean → Add → Sqrt → Reciprocal → Mul → Mul(γ)):

    x ─ RMSNorm(input) ─┬─ q_proj ─ Reshape ─ Transpose ─ RoPE ─┐
                        ├─ k_proj ─ Reshape ─ Transpose ─ RoPE ─ [Concat past] ─ repeat_kv ─ MatMul(QKᵀ) ─ … ─ Softmax
                        └─ v_proj ─ Reshape ─ Transpose ─ [Concat past] ─ repeat_kv ───────── MatMul(PV) ─┘
      PV ─ Transpose ─ Reshape ─ o_proj (out_proj) ─ Add(residual) ─ RMSNorm(post-attention)
         ─┬─ gate_proj (fc1) ─ SiLU ─┐
          └─ up_proj ─────────────── Mul ─ down_proj (fc2)

    RoPE(x) = x·cos + rotate_half(x)·sin,  rotate_half(x) = Concat(−x[..., D/2:], x[..., :D/2])
"""

from __future__ import annotations

import numpy as np
import onnx

from rptq_onnx.anatomy.records import Linear, Norm, Rope
from rptq_onnx.anatomy.walk import QDQ_OPS, LayerWalker
from rptq_onnx.vocabulary import REORDER_PREFIX

FAMILY = "llama"


def rotary(w: LayerWalker, qk: onnx.NodeProto, q: Linear, k: Linear) -> tuple[Rope, Rope, str, str]:
    """(q RoPE, k RoPE, query, key): q and k are rotated after the head split; R2 is the rotated tensors."""
    q_rope, k_rope = rope_behind(w, qk.input[0], "q"), rope_behind(w, qk.input[1], "k")
    return q_rope, k_rope, q_rope.output, k_rope.output


def rms_norm(w: LayerWalker, node: onnx.NodeProto, source: str | None = None) -> Norm | None:
    """The decomposed RMSNorm ending in ``node`` (γ · x · 1/√(mean(x²) + ε)), or None.

    ``node`` must be a Mul of a 1-D γ initializer and x·r, where r comes from ReduceMean(x²)
    of the same x. ``source``: if given, x must be this tensor (after Casts).
    """
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    slots = [i for i, t in enumerate(node.input) if w.g.is_constant(t)]
    if len(slots) != 1:
        return None
    w_slot = slots[0]
    weight = w.g.constant_source(node.input[w_slot])
    shape = w.g.constant_shape(weight) if weight else None
    if weight not in w.g.initializers or shape is None or len(shape) != 1:
        return None
    d_slot = 1 - w_slot
    normalized, gather = node.input[d_slot], None
    producer = w.g.producer.get(normalized)
    if producer is not None and producer.op_type == "Gather" and w.g.is_constant(producer.input[1]):
        normalized, gather = producer.input[0], producer.name
    scaled = w.g.producer.get(w.skip_casts(normalized))
    if scaled is None or scaled.op_type != "Mul" or len(w.g.dynamic_inputs(scaled)) != 2:
        return None
    for x_slot in (0, 1):
        x = w.skip_casts(scaled.input[x_slot])
        if _mean_square_of(w, scaled.input[1 - x_slot], x):
            if source is not None and x != w.skip_casts(source):
                return None
            return Norm(node=node.name, input=x, output=node.output[0], weight=weight, bias=None,
                        channels=int(shape[0]), gather=gather, kind="rmsnorm", data_input=d_slot,
                        weight_input=w_slot)
    return None


def _mean_square_of(w: LayerWalker, tensor: str, x: str) -> bool:
    """True when ``tensor`` = f(ReduceMean(x²)) through Add(ε) / Sqrt / Reciprocal / Div / Cast."""
    for _ in range(6):
        node = w.g.producer.get(tensor)
        if node is None:
            return False
        if node.op_type == "ReduceMean":
            sq = w.g.producer.get(node.input[0])
            if sq is None:
                return False
            if sq.op_type == "Pow":
                return w.skip_casts(sq.input[0]) == x and np.allclose(w.g.constant_value(sq.input[1]), 2)
            return sq.op_type == "Mul" and w.skip_casts(sq.input[0]) == w.skip_casts(sq.input[1]) == x
        if node.op_type not in ("Add", "Sqrt", "Reciprocal", "Div", "Cast", "Identity"):
            return False
        dynamic = w.g.dynamic_inputs(node)
        if len(dynamic) != 1:
            return False
        tensor = dynamic[0]
    return False


def rope(w: LayerWalker, add: onnx.NodeProto) -> Rope | None:
    """The rotary embedding ending in ``add`` (x·cos + Concat(−x[D/2:], x[:D/2])·sin), or None."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    muls = [w.g.producer.get(t) for t in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for cos_mul, sin_mul in (muls, muls[::-1]):
        for r_slot in (0, 1):
            x = _rotated_half_of(w, sin_mul.input[r_slot])
            if x is None or x not in cos_mul.input:
                continue
            rope = Rope(input=x, output=add.output[0], cos_mul=cos_mul.name,
                        cos_input=1 - list(cos_mul.input).index(x), sin_mul=sin_mul.name, sin_input=1 - r_slot)
            for mul, slot in ((cos_mul, rope.cos_input), (sin_mul, rope.sin_input)):
                if not _is_head_broadcast(w, mul.input[slot]):
                    raise w.fail(f"the rotary table {mul.input[slot]} is not [B, 1, S, D] (cos/sin "
                                    "unsqueezed on axis 1); this RoPE layout is not supported")
            return rope
    return None


def _is_head_broadcast(w: LayerWalker, table: str) -> bool:
    """True when ``table`` = Unsqueeze(axis 1) of [B, S, D]: one row of cos or sin for all heads
    (or, in a compiled graph, that row permuted per head by ``fold_reorder``)."""
    node = w.g.producer.get(w.skip_casts(table))
    if node is not None and node.op_type == "Squeeze" and node.name.startswith(REORDER_PREFIX):
        return True
    if node is None or node.op_type != "Unsqueeze" or len(node.input) < 2:  # opset ≥ 13: axes is an input
        return False
    axes = w.g.constant_value(node.input[1])
    return axes is not None and np.asarray(axes).ravel().tolist() == [1]


def _rotated_half_of(w: LayerWalker, tensor: str) -> str | None:
    """x when ``tensor`` = Concat(Neg(x[..., D/2:]), x[..., :D/2]) (rotate_half), else None.

    Both slices and the Concat must be on the last axis, and the halves must meet (the split
    point is checked where it is a constant; TorchScript exports compute it from the shape).
    """
    cat = w.g.producer.get(tensor)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
        return None
    if {a.name: onnx.helper.get_attribute_value(a) for a in cat.attribute}.get("axis") not in (-1, 3):
        return None
    neg = w.g.producer.get(cat.input[0])
    second = w.g.producer.get(cat.input[1])
    if neg is None or neg.op_type != "Neg" or second is None or second.op_type != "Slice":
        return None
    first = w.g.producer.get(neg.input[0])
    if first is None or first.op_type != "Slice" or first.input[0] != second.input[0]:
        return None
    if any(_slice_arg(w, s, 3) not in (-1, 3) or _slice_arg(w, s, 4, default=1) != 1 for s in (first, second)):
        return None  # not a unit-step slice of the last axis
    split, end = _slice_arg(w, first, 1), _slice_arg(w, second, 2)
    if _slice_arg(w, second, 1) != 0 or (split is not None and end is not None and split != end):
        return None  # not [D/2:] and [:D/2]
    return second.input[0]


def _slice_arg(w: LayerWalker, node: onnx.NodeProto, slot: int, default: int | None = None) -> int | None:
    """A Slice's scalar starts/ends/axes/steps input, None when it is computed at run time."""
    if len(node.input) <= slot or not node.input[slot]:
        return default
    value = w.g.constant_value(node.input[slot])
    return int(np.asarray(value).ravel()[0]) if value is not None and np.asarray(value).size == 1 else None


def rope_behind(w: LayerWalker, tensor: str, role: str) -> Rope:
    found = w.back_to(tensor, lambda n: rope(w, n) is not None, max_depth=16)
    if found is None:
        raise w.fail(f"no rotary embedding (x·cos + rotate_half(x)·sin) on {role} before QKᵀ")
    return rope(w, found[0])


def gated_mlp(w: LayerWalker, readers: set[str]) -> tuple[Linear, Linear, onnx.NodeProto, Linear]:
    """Llama SwiGLU: norm → gate_proj → SiLU (Sigmoid · x) ┐ × up_proj → down_proj."""
    nodes = [w.g.node_by_name.get(n) for n in sorted(readers)]
    if len(nodes) != 2 or not all(n is not None and w.is_linear(n) for n in nodes):
        raise w.fail("the post-attention RMSNorm output does not feed exactly two linears (gate_proj, up_proj)")
    lins = [w.linear(n, "gate_proj/up_proj") for n in nodes]
    gated = [lin for lin in lins if any(u.op_type == "Sigmoid" for u in w.g.value_readers(lin.output))]
    if len(gated) != 1:
        raise w.fail("no SiLU (x·sigmoid(x)) on exactly one of gate_proj / up_proj")
    gate = gated[0]
    up = next(lin for lin in lins if lin is not gate)
    product = next((n for n in w.g.value_readers(up.output) if n.op_type == "Mul"), None)
    if product is None or w.back_to(product.input[0] if product.input[1] == up.output else product.input[1],
                                       lambda n: n.name == gate.node, max_depth=4) is None:
        raise w.fail("no SwiGLU product SiLU(gate_proj) · up_proj")
    hit = w.forward_to(product.output[0], w.is_linear, through=QDQ_OPS, max_depth=4)
    if hit is None or hit[1] != 0:
        raise w.fail("no down_proj linear after the SwiGLU product")
    down = w.linear(hit[0], "down_proj")
    if up.out_features != gate.out_features or down.in_features != gate.out_features:
        raise w.fail("gate_proj/up_proj/down_proj shapes do not form an MLP")
    return gate, up, product, down


def ffn_norm(w: LayerWalker, residual: str) -> Norm:
    """R4: the post-attention RMSNorm of the attention residual."""
    hit = w.forward_to(residual, lambda n: rms_norm(w, n, source=residual) is not None,
                       through={"Pow", "Mul", "Cast", "Identity", "Gather"}, max_depth=4)
    if hit is None:
        raise w.fail("no post-attention RMSNorm after the attention residual")
    return rms_norm(w, hit[0], source=residual)


mlp = gated_mlp
