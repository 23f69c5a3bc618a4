"""Pass: store linear weights in low bits.

Two forms, both reading the same ``QuantizedWeight`` (codes, per-channel or per-group scales):

- ``dq``: a standard ``DequantizeLinear`` of a uint4 (≤ 4 bits; 3-bit codes live in 0..7) or
  uint8 initializer feeding the original MatMul/Gemm. The file holds low-bit weights; at run
  time ONNX Runtime dequantizes them and multiplies in float (simulated).
- ``matmulnbits``: ``com.microsoft:MatMulNBits`` (4 or 8 bits, block quantization along the
  input), ONNX Runtime's real low-bit GEMM on CPU and CUDA: the weights stay packed in memory.
  Its float input may be the output of an activation Q/DQ. Per-output-channel codes are carried
  exactly by blocks that all repeat the row's scale and zero point; 3-bit codes (0..7) sit in
  the 4-bit kernel unchanged.

Codes kept from a source that was already on a grid with a float minimum per block (a GGUF Q4_1,
rptq_onnx/source_grid.py) carry an ``offset`` per block, which MatMulNBits cannot hold (its float
zero points run 20–50× slower on the CPU). They run as MatMulNBits plus one small float MatMul:

    y = MatMulNBits(x) + block_sums(x) · offsetᵀ,   block_sums(x) = x · 1_blocks  [..., K / block]

where the block sums of an input are made once and shared by every linear reading it. With
``offset_form="blocks"`` (``--grid-offset blocks``) the offsets run inside the kernel instead, as extra
4-bit blocks over the block means (``source_grid.fold_offset``): a linear is one MatMulNBits over
``Concat(x, M, M, …)``, M = AveragePool(x) the block means, made once per input (two nodes; the offset
term's MatMul is not made).

ORT constant-folds ``DequantizeLinear`` of a constant weight into a float initializer when it
creates a session, so the ``dq`` form is low-bit in the file only; ``matmulnbits`` is the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.anatomy import Linear
from rptq_onnx.graph import declared_shape, keep_initializers
from rptq_onnx.passes.base import Pass, PassResult
from rptq_onnx.quant import QuantizedWeight, offset_columns, offset_copies, pack_uint4
from rptq_onnx.source_grid import fold_offset
from rptq_onnx.vocabulary import BLOCK_SUMS_PREFIX, OFFSET_ADD_SUFFIX, WEIGHT_PREFIX, WITH_BLOCK_SUMS_PREFIX, uint_container
from rptq_onnx.vocabulary import storage_bits as nbits_kernel_bits  # MatMulNBits' bits attribute: 4 or 8

MATMULNBITS_BLOCKS = (16, 32, 64, 128, 256)
PER_CHANNEL_BLOCKS = (128, 64, 32, 16, 256)  # per-channel codes: the first that divides the input size
# MatMulNBits' accuracy_level 4: the CPU kernel quantizes the input to int8 per block and multiplies in
# integers. 8-bit weights always use it (at level 0 this ORT's 8-bit kernel dequantizes the whole weight
# on every call, ≈ 10× slower than a float MatMul); 4-bit weights where asked (``--accuracy-level 4``)
INT8_ACCURACY_LEVEL = 4


def matmulnbits_block(qw: QuantizedWeight) -> int | None:
    """The MatMulNBits block size that carries ``qw`` exactly, or None if none does."""
    k = qw.codes.shape[1]
    if qw.group_size is not None:
        return qw.group_size if qw.group_size in MATMULNBITS_BLOCKS and k % qw.group_size == 0 else None
    return next((b for b in PER_CHANNEL_BLOCKS if k % b == 0), None)


def matmulnbits_ok(qw: QuantizedWeight) -> bool:
    return qw.bits in (3, 4, 8) and matmulnbits_block(qw) is not None


def _uint_tensor(name: str, codes: np.ndarray, bits: int) -> onnx.TensorProto:
    elem = uint_container(bits)
    if elem == onnx.TensorProto.UINT8:
        return numpy_helper.from_array(np.ascontiguousarray(codes.astype(np.uint8)), name)
    # ONNX stores uint4 packed two per byte, low nibble first, in row-major order
    flat = np.ascontiguousarray(codes.astype(np.uint8)).ravel()
    return helper.make_tensor(name, elem, list(codes.shape), pack_uint4(flat).tobytes(), raw=True)


def _dq_form(g: onnx.GraphProto, node: onnx.NodeProto, lin: Linear, qw: QuantizedWeight, prefix: str) -> onnx.NodeProto:
    codes, scale, zp = qw.codes, qw.scale, qw.zero_point  # [out, in], [out, groups]
    per_channel = qw.group_size is None
    if lin.weight_layout == "in_out":  # MatMul [in, out]
        codes, scale, zp = codes.T, scale.T, zp.T
        out_axis, in_axis = 1, 0
    else:
        out_axis, in_axis = 0, 1
    if per_channel:
        scale, zp = scale.reshape(-1), zp.reshape(-1)
        attrs = {"axis": out_axis}
    else:
        attrs = {"axis": in_axis, "block_size": qw.group_size}
    g.initializer.append(_uint_tensor(f"{prefix}.codes", codes, qw.bits))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scale.astype(np.float32)), f"{prefix}.scale"))
    g.initializer.append(_uint_tensor(f"{prefix}.zero_point", zp, qw.bits))
    dq = helper.make_node("DequantizeLinear", [f"{prefix}.codes", f"{prefix}.scale", f"{prefix}.zero_point"],
                          [f"{prefix}.weight"], name=f"{prefix}.dequantize", **attrs)
    node.input[1] = f"{prefix}.weight"
    return dq


def _matmulnbits_form(node: onnx.NodeProto, lin: Linear, qw: QuantizedWeight, prefix: str, g: onnx.GraphProto,
                      made: dict[tuple, list[onnx.NodeProto]], accuracy_level: int,
                      offset_form: str) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(the MatMulNBits node (+ the offset term, + the bias Add of a Gemm) replacing ``node``, the nodes it
    reads that are shared with other linears of the same input: ``made``, by (input, block, form))."""
    bs = matmulnbits_block(qw)
    x, shared = node.input[0], []
    n, k = qw.codes.shape
    shape = declared_shape(g, x)
    rank = None if shape is None else len(shape)
    if qw.offset is not None and offset_form == "blocks" and rank in BLOCK_MEAN_RANKS:  # (else: the offset term)
        x, shared = _with_block_means(g, x, rank, k, bs, made)
        qw = fold_offset(qw)
        k += offset_columns(k, bs)  # the extended input; its last block may be a partial one
    blocks = qw.codes.shape[1] // bs
    scale, zp = qw.scale, qw.zero_point  # [N, groups]; per channel: one group, repeated over the blocks
    if qw.group_size is None:
        scale, zp = np.repeat(scale, blocks, axis=1), np.repeat(zp, blocks, axis=1)
    bits = nbits_kernel_bits(qw.bits)
    codes = np.ascontiguousarray(qw.codes.reshape(n, blocks, bs).astype(np.uint8))
    # every zero point at the kernel's default (2^(bits-1): a kept Q4_1 grid, symmetric codes): no input 3, which
    # also puts the integer kernel (accuracy_level 4) on its symmetric path
    default_zp = bool(np.all(zp == 1 << (bits - 1)))
    if bits == 4:
        codes, zp = pack_uint4(codes), pack_uint4(zp)  # [N, K/bs, bs/2], [N, ceil(K/bs / 2)]
    g.initializer.append(numpy_helper.from_array(codes, f"{prefix}.B"))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scale.astype(np.float32).reshape(-1)),
                                                 f"{prefix}.scales"))
    inputs = [x, f"{prefix}.B", f"{prefix}.scales"]
    if not default_zp:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(zp.astype(np.uint8)), f"{prefix}.zero_points"))
        inputs.append(f"{prefix}.zero_points")
    out = node.output[0]
    steps = (["offset"] if qw.offset is not None else []) + (["bias"] if node.op_type == "Gemm" and lin.bias else [])
    result = out if not steps else f"{prefix}.matmul"
    level = INT8_ACCURACY_LEVEL if bits == 8 else accuracy_level
    attrs = {"accuracy_level": level} if level else {}
    new = [helper.make_node("MatMulNBits", inputs, [result], name=f"{prefix}.matmulnbits", domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=bs, **attrs)]
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if step == "offset":
            shared = _block_sums(g, x, k, bs, made)
            new.append(_offset_term(g, x, qw.offset, bs, prefix))
            new.append(helper.make_node("Add", [result, new[-1].output[0]], [out if last else f"{prefix}.with_offset"],
                                        name=f"{prefix}{OFFSET_ADD_SUFFIX}"))
            result = f"{prefix}.with_offset"
        else:
            new.append(helper.make_node("Add", [result, node.input[2]], [out], name=f"{prefix}.bias"))
    return new, shared


def _block_sums(g: onnx.GraphProto, x: str, k: int, bs: int, made: dict[tuple, list[onnx.NodeProto]]) -> list[onnx.NodeProto]:
    """The node making ``x``'s block sums [..., K/bs] ``{x}.block_sums{bs}``: one MatMul with a 0/1 matrix [K, K/bs]
    (any input rank), made once per input tensor and shared by the linears reading it (q/k/v, gate/up)."""
    if (x, bs, "term") not in made:
        ones = f"{WEIGHT_PREFIX}block_ones.{k}x{bs}"
        if not any(t.name == ones for t in g.initializer):
            member = np.repeat(np.eye(k // bs, dtype=np.float32), bs, axis=0)  # [K, K/bs]
            g.initializer.append(numpy_helper.from_array(member, ones))
        made[(x, bs, "term")] = [helper.make_node("MatMul", [x, ones], [f"{x}.block_sums{bs}"],
                                                  name=f"{BLOCK_SUMS_PREFIX}{x}.{bs}")]
    return made[(x, bs, "term")]


def _offset_term(g: onnx.GraphProto, x: str, offset: np.ndarray, bs: int, prefix: str) -> onnx.NodeProto:
    """The node computing Σ_b offset[n, b] · (sum of ``x`` over block b): a MatMul on ``x``'s block sums."""
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(offset.T.astype(np.float32)), f"{prefix}.offset"))
    return helper.make_node("MatMul", [f"{x}.block_sums{bs}", f"{prefix}.offset"], [f"{prefix}.offset_term"],
                            name=f"{prefix}.offset_term")


BLOCK_MEAN_RANKS = (2, 3, 4, 5)  # inputs whose block means AveragePool makes (rank 2 through a [N, 1, K] view)


def _with_block_means(g: onnx.GraphProto, x: str, rank: int, k: int, bs: int,
                      made: dict[tuple, list[onnx.NodeProto]]) -> tuple[str, list[onnx.NodeProto]]:
    """(``x`` extended by copies of its block means as ``source_grid.fold_offset``'s codes read them, [x, M, M, …];
    the nodes making it: an AveragePool over the last axis (blocks of ``bs``, no padding) and a Concat, made once
    per input tensor; a rank-2 input pools through a [N, 1, K] view)."""
    if (x, bs, "blocks") not in made:
        p, means = f"{BLOCK_SUMS_PREFIX}{x}.{bs}", f"{x}.block_means{bs}"
        window = dict(kernel_shape=[1] * max(rank - 3, 0) + [bs], strides=[1] * max(rank - 3, 0) + [bs])
        if rank == 2:
            view, unview = f"{WEIGHT_PREFIX}rows_1_{k}", f"{WEIGHT_PREFIX}rows_{k // bs}"
            have = {t.name for t in g.initializer}
            for name, value in ((view, [0, 1, k]), (unview, [0, k // bs])):
                if name not in have:
                    g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
            nodes = [helper.make_node("Reshape", [x, view], [f"{x}.rows"], name=f"{p}.view"),
                     helper.make_node("AveragePool", [f"{x}.rows"], [f"{means}.rows"], name=f"{p}.pool", **window),
                     helper.make_node("Reshape", [f"{means}.rows", unview], [means], name=f"{p}.unview")]
        else:
            nodes = [helper.make_node("AveragePool", [x], [means], name=f"{p}.pool", **window)]
        nodes.append(helper.make_node("Concat", [x] + [means] * offset_copies(k, bs), [f"{x}.with_block_means{bs}"],
                                      name=f"{WITH_BLOCK_SUMS_PREFIX}{x}.{bs}", axis=-1))
        made[(x, bs, "blocks")] = nodes
    return made[(x, bs, "blocks")][-1].output[0], made[(x, bs, "blocks")]


@dataclass
class WeightsReport:
    dq: int = 0  # linears in the DequantizeLinear form
    matmulnbits: int = 0  # linears as MatMulNBits
    kept_source_grid: int = 0  # of those, codes kept from the source's grid with a float offset (term or blocks)


class QuantizeWeights(Pass[WeightsReport]):
    """Replace each linear's float weight (``weights``: node name → (Linear, QuantizedWeight)); edits in place.
    ``accuracy_level``: of the 4-bit MatMulNBits (8-bit ones always take 4); ``offset_form``: how codes with an
    ``offset`` (kept from a source grid) carry it, ``term`` (exact: an offset MatMul and Add per linear) or
    ``blocks`` (inside the kernel: ``source_grid.fold_offset``). Such codes need the ``matmulnbits`` form."""

    name = "quantize_weights"

    def __init__(self, weights: dict[str, tuple[Linear, QuantizedWeight]], form: str = "dq", accuracy_level: int = 0,
                 offset_form: str = "term"):
        self.weights, self.form, self.accuracy_level, self.offset_form = weights, form, accuracy_level, offset_form

    def requires(self, model: onnx.ModelProto) -> str | None:
        nodes = {n.name for n in model.graph.node}
        missing = next((name for name in self.weights if name not in nodes), None)
        return f"no node {missing} in the graph" if missing else None

    def apply(self, model: onnx.ModelProto) -> PassResult[WeightsReport]:
        g = model.graph
        report = WeightsReport()
        replaced: dict[str, list[onnx.NodeProto]] = {}
        before: dict[str, list[onnx.NodeProto]] = {}
        nodes = {n.name: n for n in g.node}
        shared: dict[tuple, list[onnx.NodeProto]] = {}
        for name, (lin, qw) in self.weights.items():
            node = nodes[name]
            prefix = f"{WEIGHT_PREFIX}{name}"
            if self.form == "matmulnbits" and matmulnbits_ok(qw):
                replaced[name], before[name] = _matmulnbits_form(node, lin, qw, prefix, g, shared, self.accuracy_level,
                                                                 self.offset_form)
                report.matmulnbits += 1
                report.kept_source_grid += qw.offset is not None
            elif qw.offset is not None:
                raise ValueError(f"{name}: codes with a float offset need the matmulnbits form")
            else:
                before[name] = [_dq_form(g, node, lin, qw, prefix)]
                report.dq += 1
        ordered, made = [], set()
        for node in g.node:
            for extra in before.get(node.name, []):  # block sums shared by several linears: made once
                if extra.name not in made:
                    made.add(extra.name)
                    ordered.append(extra)
            ordered.extend(replaced.get(node.name, [node]))
        del g.node[:]
        g.node.extend(ordered)
        if report.matmulnbits and not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        _drop_unused_initializers(model)
        return PassResult(model, report, modified=bool(self.weights))


def quantize_weights(model: onnx.ModelProto, weights: dict[str, tuple[Linear, QuantizedWeight]],
                     form: str = "dq", accuracy_level: int = 0, offset_form: str = "term") -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with low-bit weights (``QuantizeWeights``); returns (model, report)."""
    result = QuantizeWeights(weights, form, accuracy_level, offset_form).run(model)
    return result.model, dataclasses.asdict(result.report)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    keep_initializers(model.graph, {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output})
