"""Pass: fuse each layer's eager attention into one ``com.microsoft:GroupQueryAttention`` (GQA).

The exported graphs keep attention eager so that the RPTQ passes can see q, k, v and QKᵀ:

    q ─ (Reshape, Transpose) ─┐
    past_k ─ Concat(new k) ─ present_k ─ … ─ QKᵀ ─ [× scale] ─ + mask ─ Softmax ─ PV ─ Transpose ─ Reshape ─ out_proj
    past_v ─ Concat(new v) ─ present_v ───────────────────────────────────────────┘

This pass replaces all of it, per layer, by one GQA node over the same q, k and v ([B, S, C],
k/v as fake-quantized by the KV presets), the graph's own additive mask as ``attention_bias``
(causal and padding, exactly as eager), ``seqlens_k = total − 1`` for every row and
``total_sequence_length`` read off ``attention_mask``. With ``cache_bits`` the cache is kept by
the kernel in low bits: int8 [B, kv_heads, T, D] for 5–8 bits, or 4-bit codes two per byte,
uint8 [B, kv_heads, T, D/2] (3-bit codes are −4..3 inside the 4-bit grid). The kernel quantizes
the new K/V itself, symmetric per channel, and attends over the quantized values; the K/V Q/DQ
points before it put them on exactly that grid, so cached decoding equals recomputation.

GQA's grid is symmetric (no zero point), RPTQ's clusters are asymmetric. Where the maths allows,
the zero point leaves the grid exactly:

- **V**: each row of P sums to 1, so P·(V − m) + m = P·V. The per-channel offset m (the
  cluster's zero point in float) is subtracted in v_proj's bias and W_oᵀ·m added to out_proj's.
- **K without RoPE (OPT)**: q·(k − m) differs from q·k by q·m, the same for every key of one
  query, which softmax ignores: m is subtracted in k_proj's bias and nothing is added back.
- **K after RoPE (Llama)**: no offset is constant through the rotation; its Q/DQ point must
  already be symmetric per cluster (``quantize.py`` makes it so when attention is fused).

**RoPE inside the kernel** (``rotary_positions``, Llama): GQA rotates q and k itself
(``do_rotary``) from cos/sin caches [positions, D/2] evaluated from the graph's own rotary tables,
so q and k enter straight from their linears and the rotation and head-layout nodes go. The kernel
quantizes K after rotating it, onto the same per-channel scales, so the cache grid is unchanged.
It applies where nothing sits between RoPE and attention (a 3-bit K keeps its Q/DQ there: explicit
RoPE), the tables are the graph's (not permuted per head by a contiguous-layout reorder), and
head_dim is a multiple of 16. The kernel takes positions from the sequence lengths (0… on a prompt,
total − 1 when decoding): without padding those are the graph's ``position_ids``; a left-padded row
is rotated shifted by its padding, which leaves q·k unchanged (RoPE is relative) up to the
rounding of its 4-bit K codes.

The fused graph computes the same function as the eager one over the same grid (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from rptq_onnx.anatomy import DecoderLayer, Linear, find_layers
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex, prune_dead_nodes, rename_inputs, topological_order
from rptq_onnx.passes.base import Pass, PassResult
from rptq_onnx.quant import dequantized_weight
from rptq_onnx.vocabulary import ATTENTION_PREFIX, LAYOUT_PREFIX, QDQ_PREFIX, storage_bits

HEADS_TO_TOKENS = [0, 2, 1, 3]  # [B, H, S, D] ↔ [B, S, H, D]


@dataclass
class FuseReport:
    layers: int = 0
    cache: str = "float"  # float, int8 or int4 (the kernel's cache storage)
    offsets_folded: int = 0  # K/V points whose zero point moved into biases
    bias_adds: int = 0  # Add nodes inserted where a linear had no bias to take an offset
    kv_qdq_dropped: int = 0  # K/V points whose Q/DQ the kernel's own quantization replaces
    rotary_in_kernel: int = 0  # layers whose RoPE GQA applies (do_rotary)
    qkv_packed: int = 0  # layers whose q/k/v run as one MatMulNBits (passes/pack_qkv.py)
    norms_fused: int = 0  # RMSNorms as one SimplifiedLayerNormalization (passes/fuse_norms.py)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def fusable(model: onnx.ModelProto) -> str | None:
    """Why this graph's attention cannot be fused, or None."""
    index = GraphIndex(model)
    if any(n.name.startswith(QDQ_PREFIX) and n.name.endswith(".P.quantize") for n in index.nodes):
        return "the softmax output P is quantized (the W*A* presets), which GroupQueryAttention cannot do"
    inputs = {i.name for i in model.graph.input}
    if "attention_mask" not in inputs:
        return "the graph has no attention_mask input"
    if not any(i.name.startswith("past_key_values.") for i in model.graph.input):
        return "the graph has no KV cache (export it with --with-past)"
    return None


class FuseAttention(Pass[FuseReport]):
    """Every layer's attention as one GQA node (edits in place).

    ``cache_bits``: the K/V points' bit width (a low-bit cache), or None for a float cache.
    """

    name = "fuse_attention"

    def __init__(self, layers: list[DecoderLayer] | None = None, cache_bits: int | None = None,
                 rotary_positions: int | None = None):
        self.layers, self.cache_bits, self.rotary_positions = layers, cache_bits, rotary_positions

    def requires(self, model: onnx.ModelProto) -> str | None:
        why = fusable(model)
        return f"--attention fused cannot apply: {why}; use --attention eager" if why else None

    def apply(self, model: onnx.ModelProto) -> PassResult[FuseReport]:
        layers = self.layers if self.layers is not None else find_layers(model)
        report = FuseReport(cache="float" if self.cache_bits is None else f"int{storage_bits(self.cache_bits)}")
        g = model.graph
        seqlens, total = _sequence_lengths(g)
        for layer in layers:
            index = GraphIndex(model)
            _fuse_layer(model, index, layer, self.cache_bits, seqlens, total, self.rotary_positions, report)
            report.layers += 1
        prune_dead_nodes(model)
        _drop_unread_positions(g)
        order = topological_order(g.node, [i.name for i in g.input])
        del g.node[:]
        g.node.extend(order)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return PassResult(model, report)


def fuse_attention(model: onnx.ModelProto, layers: list[DecoderLayer] | None = None,
                   cache_bits: int | None = None, rotary_positions: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with every layer's attention as one GQA node (``FuseAttention``); returns
    (model, report)."""
    result = FuseAttention(layers, cache_bits, rotary_positions).run(model)
    return result.model, result.report.as_dict()


def _sequence_lengths(g: onnx.GraphProto) -> tuple[str, str]:
    """Nodes computing (seqlens_k int32 [B] = total − 1 for every row, total_sequence_length int32 scalar)."""
    p = f"{ATTENTION_PREFIX}lengths"
    if any(n.name == f"{p}.shape" for n in g.node):  # made by an earlier run over other layers
        return f"{p}.seqlens32", f"{p}.total32"
    g.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), f"{p}.zero"),
                          numpy_helper.from_array(np.array(1, np.int64), f"{p}.one"),
                          numpy_helper.from_array(np.array([0], np.int64), f"{p}.axis0")])
    g.node.extend([
        helper.make_node("Shape", ["attention_mask"], [f"{p}.shape"], name=f"{p}.shape"),
        helper.make_node("Gather", [f"{p}.shape", f"{p}.one"], [f"{p}.total64"], name=f"{p}.total", axis=0),
        helper.make_node("Cast", [f"{p}.total64"], [f"{p}.total32"], name=f"{p}.total_int32", to=onnx.TensorProto.INT32),
        helper.make_node("Gather", [f"{p}.shape", f"{p}.axis0"], [f"{p}.batch"], name=f"{p}.batch", axis=0),
        helper.make_node("Sub", [f"{p}.total64", f"{p}.one"], [f"{p}.last64"], name=f"{p}.last"),
        helper.make_node("Expand", [f"{p}.last64", f"{p}.batch"], [f"{p}.seqlens64"], name=f"{p}.expand"),
        helper.make_node("Cast", [f"{p}.seqlens64"], [f"{p}.seqlens32"], name=f"{p}.seqlens_int32",
                         to=onnx.TensorProto.INT32),
    ])
    return f"{p}.seqlens32", f"{p}.total32"


def _fuse_layer(model: onnx.ModelProto, index: GraphIndex, layer: DecoderLayer, cache_bits: int | None,
                seqlens: str, total: str, rotary_positions: int | None, report: FuseReport) -> None:
    g = model.graph
    i = layer.index
    p = f"{ATTENTION_PREFIX}L{i}"
    where = f"layer {i}"

    def fail(what: str) -> RptqError:
        return RptqError(f"--attention fused cannot apply: {where}: {what}; use --attention eager")

    if not (layer.past_key and layer.present_key and layer.past_value and layer.present_value):
        raise fail("no KV cache input/output")
    qk = index.node_by_name[layer.qk_matmul]
    pv = index.node_by_name[layer.pv_matmul]
    cat_k, cat_v = index.producer.get(layer.present_key), index.producer.get(layer.present_value)
    if cat_k is None or cat_v is None or cat_k.op_type != "Concat" or cat_v.op_type != "Concat":
        raise fail("the cache is not a Concat of past and new K/V (was the KV-cache pass run already?)")

    scale, bias = _scale_and_mask(index, qk, fail)
    new_nodes: list[onnx.NodeProto] = []
    attrs = {"num_heads": layer.num_heads, "kv_num_heads": layer.num_kv_heads, "scale": float(scale)}
    scales = ["", ""]
    if cache_bits is not None:  # first: an offset moved out of V may add a node in front of its Q/DQ
        k_scale = _symmetric_point(model, index, layer, "k", fold=layer.q_rope is None, report=report)
        v_scale = _symmetric_point(model, index, layer, "v", fold=True, report=report)
        scales = [k_scale, v_scale]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=storage_bits(cache_bits))
        _retype_cache(g, layer, storage_bits(cache_bits))
    # at the kernel's own width, its quantization of the new K/V is the K/V point's (symmetric, per channel,
    # the same scales): the point's Q/DQ before it would round twice onto one grid, so GQA takes the float
    # K/V; 3-bit codes keep it (they use half of the 4-bit kernel's grid)
    own = _before_point if cache_bits is not None and storage_bits(cache_bits) == cache_bits else (lambda _, t: t)
    q_in, k_in = qk.input[0], own(index, cat_k.input[1])
    rotary = None
    if rotary_positions and layer.q_rope and layer.k_rope and (q_in, k_in) == (layer.q_rope.output,
                                                                               layer.k_rope.output):
        rotary = _rotary_caches(model, index, layer, rotary_positions)  # nothing between RoPE and GQA
    if rotary:
        q_in, k_in = layer.q_rope.input, layer.k_rope.input
        attrs.update(do_rotary=1, rotary_interleaved=0)
        report.rotary_in_kernel += 1
    query = _tokens_major(g, index, q_in, layer.num_heads, f"{p}.q", new_nodes)
    key = own(index, _tokens_major(g, index, k_in, layer.num_kv_heads, f"{p}.k", new_nodes))
    value = own(index, _tokens_major(g, index, own(index, cat_v.input[1]), layer.num_kv_heads, f"{p}.v", new_nodes))
    report.kv_qdq_dropped += 2 * (own is _before_point)
    attn = _merged_output(index, pv, fail)
    gqa = helper.make_node(
        "GroupQueryAttention",
        [query, key, value, layer.past_key, layer.past_value, seqlens, total, *(rotary or ("", "")), "", bias or "", "",
         *scales],
        [attn, layer.present_key, layer.present_value], name=f"{p}.gqa", domain="com.microsoft", **attrs)
    # the eager nodes that produced the tensors GQA now produces go; what fed only them is pruned
    for node in (cat_k, cat_v, index.producer[attn]):
        g.node.remove(node)
    g.node.extend([*new_nodes, gqa])


def _rotary_caches(model: onnx.ModelProto, index: GraphIndex, layer: DecoderLayer,
                   positions: int) -> tuple[str, str] | None:
    """GQA's (cos_cache, sin_cache) [positions, D/2] for ``layer``'s RoPE, evaluated from the graph's own
    [B, 1, S, D] tables (shared by the layers reading the same tables), or None where the kernel cannot
    rotate as the graph does: q and k on other tables, a head_dim the CPU kernel refuses, or
    tables that are not D/2 frequencies repeated (HF's non-interleaved form; a per-head permuted table
    is not)."""
    q, k = layer.q_rope, layer.k_rope
    if layer.head_dim % 16:
        return None
    tables = [index.node_by_name[q.cos_mul].input[q.cos_input], index.node_by_name[q.sin_mul].input[q.sin_input]]
    if tables != [index.node_by_name[k.cos_mul].input[k.cos_input], index.node_by_name[k.sin_mul].input[k.sin_input]]:
        return None
    names = (f"{ATTENTION_PREFIX}{tables[0]}.cos_cache", f"{ATTENTION_PREFIX}{tables[1]}.sin_cache")
    if all(name in index.initializers for name in names):  # made for an earlier layer
        return names
    values = _evaluate_tables(model, index, tables, positions)
    if values is None:
        return None
    half = layer.head_dim // 2
    caches = []
    for value in values:
        value = np.asarray(value, np.float32).reshape(positions, -1)
        if value.shape[1] != layer.head_dim or not np.array_equal(value[:, :half], value[:, half:]):
            return None
        caches.append(np.ascontiguousarray(value[:, :half]))
    model.graph.initializer.extend(numpy_helper.from_array(c, name) for c, name in zip(caches, names))
    return names


_TABLE_FEEDS = {"position_ids": lambda n: np.arange(n, dtype=np.int64)[None],
                "input_ids": lambda n: np.zeros((1, n), np.int64), "attention_mask": lambda n: np.ones((1, n), np.int64)}


def _evaluate_tables(model: onnx.ModelProto, index: GraphIndex, tensors: list[str], positions: int) -> list | None:
    """``tensors`` for one row of ``positions`` tokens (positions 0…), computed by the part of the graph
    that makes them (a small ONNX Runtime session); None if that part needs more than the token inputs,
    an external weight or a subgraph."""
    from rptq_onnx.runtime import make_session

    graph_inputs = {i.name: i for i in model.graph.input}
    nodes: dict[int, onnx.NodeProto] = {}
    inputs, inits, stack, seen = set(), set(), list(tensors), set()
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in seen:
            continue
        seen.add(tensor)
        if tensor in graph_inputs:
            inputs.add(tensor)
        elif tensor in index.initializers:
            inits.add(tensor)
        elif (node := index.producer.get(tensor)) is not None:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return None
            nodes[id(node)] = node
            stack.extend(node.input)
        else:
            return None
    if not inputs <= set(_TABLE_FEEDS) or any(uses_external_data(index.initializers[t]) for t in inits):
        return None
    order = topological_order(nodes.values(), list(inputs))
    graph = helper.make_graph(order, "rotary_tables", [graph_inputs[name] for name in sorted(inputs)],
                              [onnx.ValueInfoProto(name=t) for t in tensors],
                              [index.initializers[t] for t in sorted(inits)])
    tables = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return make_session(tables.SerializeToString()).run(tensors, {n: _TABLE_FEEDS[n](positions) for n in inputs})


def _drop_unread_positions(g: onnx.GraphProto) -> None:
    """Remove the ``position_ids`` input once nothing reads it (RoPE inside every GQA): the runtimes feed
    it only where the graph takes it."""
    if any("position_ids" in n.input for n in g.node):
        return
    kept = [i for i in g.input if i.name != "position_ids"]
    if len(kept) < len(g.input):
        del g.input[:]
        g.input.extend(kept)


def _before_point(index: GraphIndex, tensor: str) -> str:
    """The float tensor behind an activation point's Q/DQ (and the head-layout reshapes around it)."""
    while (node := index.producer.get(tensor)) is not None and node.name.startswith((QDQ_PREFIX, LAYOUT_PREFIX)):
        tensor = node.input[0]
    return tensor


def _scale_and_mask(index: GraphIndex, qk: onnx.NodeProto, fail) -> tuple[float, str | None]:
    """QKᵀ → [Mul(scale)] → [Add(mask)] → Softmax: (the scale, the additive mask tensor or None)."""
    scale, mask = 1.0, None
    tensor = qk.output[0]
    for _ in range(3):
        readers = index.consumers.get(tensor, [])
        if len(readers) != 1:
            raise fail("QKᵀ feeds more than the softmax")
        node = readers[0]
        if node.op_type == "Softmax":
            return scale, mask
        other = [t for t in node.input if t != tensor]
        if node.op_type in ("Mul", "Div") and len(other) == 1 and index.is_constant(other[0]):
            c = np.asarray(index.constant_value(other[0]), np.float64)
            if c.size != 1:
                raise fail("QKᵀ is scaled by a non-scalar")
            scale *= float(c.ravel()[0]) if node.op_type == "Mul" else 1.0 / float(c.ravel()[0])
        elif node.op_type == "Add" and len(other) == 1 and mask is None:
            mask = other[0]
        else:
            raise fail(f"unexpected {node.op_type} between QKᵀ and the softmax")
        tensor = node.output[0]
    raise fail("no softmax after QKᵀ")


def _tokens_major(g: onnx.GraphProto, index: GraphIndex, tensor: str, heads: int, tag: str,
                  new_nodes: list[onnx.NodeProto]) -> str:
    """The [B, S, heads·D] tensor behind a [B, heads, S, D] one: the export's own Reshape input when
    ``tensor`` = Transpose(Reshape(x)), else a Transpose + Reshape added here (after RoPE)."""
    node = index.producer.get(tensor)
    if node is not None and node.op_type == "Transpose" and _perm(node) == HEADS_TO_TOKENS:
        reshape = index.producer.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape":
            return reshape.input[0]
    shape = f"{tag}.tokens_shape"
    if shape not in index.initializers:
        g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), shape))
    new_nodes += [
        helper.make_node("Transpose", [tensor], [f"{tag}.bshd"], name=f"{tag}.transpose", perm=HEADS_TO_TOKENS),
        helper.make_node("Reshape", [f"{tag}.bshd", shape], [f"{tag}.tokens"], name=f"{tag}.reshape"),
    ]
    return f"{tag}.tokens"


def _merged_output(index: GraphIndex, pv: onnx.NodeProto, fail) -> str:
    """PV → Transpose(0, 2, 1, 3) → Reshape [B, S, H·D]: the Reshape's output (out_proj's input)."""
    readers = index.consumers.get(pv.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Transpose" and _perm(readers[0]) == HEADS_TO_TOKENS:
        after = index.consumers.get(readers[0].output[0], [])
        if len(after) == 1 and after[0].op_type == "Reshape":
            return after[0].output[0]
    raise fail("the attention output is not PV → Transpose → Reshape")


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), [])


def _symmetric_point(model: onnx.ModelProto, index: GraphIndex, layer: DecoderLayer, tap: str, fold: bool,
                     report: FuseReport) -> str:
    """Put the K or V Q/DQ point on GQA's symmetric grid; returns its per-channel scale initializer.

    The point's zero point z becomes 2ⁿ⁻¹ (the middle of the uint grid, = code 0 of the kernel's
    signed grid) and its offset m = (2ⁿ⁻¹ − z)·s moves into the biases (``fold``), which keeps
    every quantized value where it was: (q − z)·s = (q − 2ⁿ⁻¹)·s + m.
    """
    prefix = f"{QDQ_PREFIX}L{layer.index}.{tap}"
    quant = index.node_by_name.get(f"{prefix}.quantize")
    if quant is None:
        raise RptqError(f"--attention fused with a low-bit cache: layer {layer.index} has no {tap} Q/DQ point")
    scale = numpy_helper.to_array(index.initializers[f"{prefix}.scale"]).astype(np.float32)
    zp_init = index.initializers[f"{prefix}.zero_point"]
    zp = numpy_helper.to_array(zp_init).astype(np.int64)
    clip = index.node_by_name.get(f"{prefix}.clip")
    bits = int(np.asarray(index.constant_value(clip.input[2])).item()).bit_length() if clip else \
        (4 if zp_init.data_type == onnx.TensorProto.UINT4 else 8)
    mid = 1 << (bits - 1)
    offset = ((mid - zp) * scale.astype(np.float64)).astype(np.float32)  # per channel, in float
    if np.any(offset != 0):
        if not fold:
            raise RptqError(f"--attention fused: layer {layer.index} {tap} is not symmetric (K after RoPE takes no "
                            "offset); compile with --attention fused from the start so its grid is made symmetric")
        if tap == "k":
            _add_to_output(model, index, layer.k_proj, -offset, f"{ATTENTION_PREFIX}L{layer.index}.k_offset", report)
        else:
            _add_to_output(model, index, layer.v_proj, -offset, f"{ATTENTION_PREFIX}L{layer.index}.v_offset", report)
            heads = np.repeat(np.arange(layer.num_kv_heads), layer.group)  # query head → its K/V head
            per_query = offset.reshape(layer.num_kv_heads, layer.head_dim)[heads].reshape(-1)
            w = dequantized_weight(index, layer.out_proj)  # [in, out], as the graph computes with it
            back = (per_query.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)
            _add_to_output(model, index, layer.out_proj, back, f"{ATTENTION_PREFIX}L{layer.index}.out_offset", report,
                           kernel_bias=True)
        report.offsets_folded += 1
    new_zp = helper.make_tensor(zp_init.name, zp_init.data_type, list(zp_init.dims), [mid] * int(zp.size))
    zp_init.CopyFrom(new_zp)
    return f"{prefix}.scale"


def _add_to_output(model: onnx.ModelProto, index: GraphIndex, lin: Linear, delta: np.ndarray, name: str,
                   report: FuseReport, kernel_bias: bool = False) -> None:
    """Add ``delta`` to a linear's output: into its bias initializer (a private copy), into a MatMulNBits' own
    bias input (``kernel_bias``; not for q/k/v, which passes/pack_qkv.py packs with their Adds) or by a new Add."""
    g = model.graph
    kernel = index.node_by_name[lin.node]
    if kernel_bias and not lin.bias and kernel.op_type == "MatMulNBits" and not any(kernel.input[4:]):
        g.initializer.append(numpy_helper.from_array(delta.astype(np.float32), f"{name}.bias"))
        kernel.input.extend([""] * (5 - len(kernel.input)) + [f"{name}.bias"])
        return
    if lin.bias and lin.bias in index.initializers:
        bias = numpy_helper.to_array(index.initializers[lin.bias]).astype(np.float32)
        g.initializer.append(numpy_helper.from_array((bias + delta).astype(np.float32), f"{name}.bias"))
        reader = index.node_by_name[lin.bias_node] if lin.bias_node else index.node_by_name[lin.node]
        rename_inputs([reader], {lin.bias: f"{name}.bias"})
        return
    g.initializer.append(numpy_helper.from_array(delta.astype(np.float32), f"{name}.delta"))
    shifted = f"{name}.output"
    rename_inputs(index.consumers.get(lin.output, []), {lin.output: shifted})
    g.node.append(helper.make_node("Add", [lin.output, f"{name}.delta"], [shifted], name=f"{name}.add"))
    report.bias_adds += 1


def _retype_cache(g: onnx.GraphProto, layer: DecoderLayer, bits: int) -> None:
    """past/present K/V as the kernel stores them: int8 [B, kv, T, D] or packed 4-bit uint8 [B, kv, T, D/2]."""
    elem = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.UINT8
    width = layer.head_dim if bits == 8 else (layer.head_dim + 1) // 2
    for values, names, tokens in ((g.input, (layer.past_key, layer.past_value), "past"),
                                  (g.output, (layer.present_key, layer.present_value), "total")):
        for v in values:
            if v.name in names:
                t = v.type.tensor_type
                t.elem_type = elem
                t.shape.Clear()
                for d in ("batch", layer.num_kv_heads, tokens, width):
                    dim = t.shape.dim.add()
                    if isinstance(d, int):
                        dim.dim_value = d
                    else:
                        dim.dim_param = d
    stale = {layer.past_key, layer.past_value, layer.present_key, layer.present_value}
    kept = [vi for vi in g.value_info if vi.name not in stale]
    del g.value_info[:]
    g.value_info.extend(kept)
