"""The decoder layers of a graph: each anchored on its attention Softmax and matched as OPT or Llama."""

from __future__ import annotations

import onnx

from rptq_onnx.anatomy import llama, opt
from rptq_onnx.anatomy.cache import graph_output_on_path, past_input
from rptq_onnx.anatomy.records import DecoderLayer, ModelMap
from rptq_onnx.anatomy.shapes import infer_shapes
from rptq_onnx.anatomy.walk import QDQ_OPS, LayerWalker
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex

FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "SparseAttention"}


def find_layers(model: onnx.ModelProto) -> list[DecoderLayer]:
    """The decoder layers (pre-LN OPT or Llama) of ``model`` in order, or a one-line RptqError."""
    return list(map_model(model).layers)


def map_model(model: onnx.ModelProto) -> ModelMap:
    """Every decoder layer of ``model`` (one per attention Softmax, in graph order) and model-level facts."""
    index = GraphIndex(model)
    fused = sorted({n.op_type for n in index.nodes if n.op_type in FUSED_ATTENTION})
    if fused:
        raise RptqError(f"the graph has fused attention ({', '.join(fused)}), which hides q/k/v and QKᵀ; "
                        "export it without attention fusion (rptq-onnx export)")
    softmaxes = sorted((n for n in index.nodes if n.op_type == "Softmax"), key=lambda n: index.position[id(n)])
    if not softmaxes:
        raise RptqError("not a decoder graph: no attention Softmax found; export an OPT or Llama model with `rptq-onnx export`")
    shapes, shape_error = infer_shapes(model)
    layers = [match_layer(index, shapes, i, sm) for i, sm in enumerate(softmaxes)]
    with_past = all(layer.past_key and layer.present_key for layer in layers)
    shared = frozenset(name for name in index.initializers if len(index.readers_of_initializer(name)) > 1)
    return ModelMap(layers=tuple(layers), with_past=with_past, shared_initializers=shared,
                    shape_inference_error=shape_error)


def match_layer(index: GraphIndex, shapes: dict[str, list], layer: int, softmax: onnx.NodeProto) -> DecoderLayer:
    """The decoder layer whose attention ``softmax`` is, walked from there; a one-line RptqError if it is not one."""
    m = LayerWalker(index, shapes, layer)
    found = m.back_to(softmax.input[0], m.is_dynamic_matmul, max_depth=6)
    if found is None:
        raise m.fail("no QKᵀ MatMul before the attention Softmax")
    qk = found[0]
    pv_hit = m.forward_to(softmax.output[0], lambda n: m.is_dynamic_matmul(n),
                          through={"Cast", "Identity", "Dropout", "Where", "Div", "Mul"} | QDQ_OPS)  # Div/Mul: a per-row P
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
        attn_norm = opt.layer_norm(m, ln_node, "attention")
    elif ln_node is not None:
        attn_norm = llama.rms_norm(m, ln_node)
    if attn_norm is None:
        what = ln_node.op_type if ln_node is not None else "a graph input"
        raise m.fail(f"q/k/v read {what}, not a LayerNormalization or RMSNorm output (post-LN OPT such as opt-350m, "
                     "do_layer_norm_before=False, is not supported)")
    if m.readers_through_qdq(ln_out) != {q.node, k.node, v.node}:
        raise m.fail("the attention norm output also feeds the residual (post-LN OPT such as opt-350m, "
                     "do_layer_norm_before=False, is not supported)")
    family = llama if attn_norm.kind == "rmsnorm" else opt

    # R2: with RoPE (Llama) the rotated q and k are quantized
    q_rope, k_rope, query, key = family.rotary(m, qk, q, k)

    # R3: PV → Transpose → Reshape → out_proj
    hit = m.forward_to(pv.output[0], m.is_linear, through={"Transpose", "Reshape", "Cast", "Identity"} | QDQ_OPS)
    if hit is None or hit[1] != 0:
        raise m.fail("no out_proj linear after the attention")
    out_proj = m.linear(hit[0], "out_proj")

    # residual add, then R4: the final / post-attention norm (through the reshape to 2-D)
    residual = next((n for n in index.consumers.get(out_proj.output, []) if n.op_type == "Add"), None)
    if residual is None or attn_norm.input not in {m.skip_casts(t) for t in _reshape_sources(index, residual)}:
        raise m.fail("no residual Add of the attention output and the attention norm input")
    final_norm = family.ffn_norm(m, residual.output[0])
    fc1, up, act, fc2 = family.mlp(m, m.readers_through_qdq(final_norm.output))

    hidden = q.in_features
    present_key = graph_output_on_path(index, k.output, qk.input[1])
    present_value = graph_output_on_path(index, v.output, pv.input[1])
    num_heads, head_dim = _heads(m, qk, q.out_features, present_key)
    if k.out_features % head_dim or num_heads % (k.out_features // head_dim):
        raise m.fail(f"k_proj has {k.out_features} outputs, not a whole number of K/V heads of {head_dim} "
                     f"dividing the {num_heads} query heads")
    return DecoderLayer(
        index=layer, num_heads=num_heads, head_dim=head_dim, hidden_size=hidden, ffn_dim=fc1.out_features,
        attn_norm=attn_norm, q_proj=q, k_proj=k, v_proj=v, qk_matmul=qk.name, softmax=softmax.name,
        softmax_output=softmax.output[0], pv_matmul=pv.name, out_proj=out_proj, final_norm=final_norm,
        fc1=fc1, activation=act.name, fc2=fc2, attn_output=m.before_qdq(out_proj.input), mlp_hidden=m.before_qdq(fc2.input),
        query=query, key=key, family=family.FAMILY, num_kv_heads=k.out_features // head_dim, up_proj=up,
        q_rope=q_rope, k_rope=k_rope,
        past_key=past_input(index, present_key), past_value=past_input(index, present_value),
        present_key=present_key, present_value=present_value)


def _heads(w: LayerWalker, qk: onnx.NodeProto, q_channels: int, present: str | None) -> tuple[int, int]:
    """(heads, head_dim) of the query side; ``q_channels`` is q_proj's output size, which need not
    equal the hidden size (Llama configs with an explicit head_dim)."""
    for tensor in (qk.input[1], qk.input[0], present):
        dims = w.shapes.get(tensor) if tensor else None
        if dims and len(dims) == 4:
            h = dims[1]
            d = dims[2] if tensor == qk.input[1] else dims[3]
            if isinstance(d, int) and not isinstance(h, int) and tensor != present and q_channels % d == 0:
                h = q_channels // d  # a view(..., -1, head_dim) leaves the head count symbolic
            if isinstance(h, int) and isinstance(d, int) and h * d == q_channels:
                return h, d
    raise w.fail("cannot determine the number of attention heads from the graph's shapes")


def _reshape_sources(index: GraphIndex, node: onnx.NodeProto) -> set[str]:
    """Inputs of ``node`` and what they were reshaped from (the residual is [B*S, C] in the MLP)."""
    names = set(node.input)
    for t in list(node.input):
        producer = index.producer.get(t)
        if producer is not None and producer.op_type in ("Reshape", "Identity"):
            names.add(producer.input[0])
    return names
