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

ORT constant-folds ``DequantizeLinear`` of a constant weight into a float initializer when it
creates a session, so the ``dq`` form is low-bit in the file only; ``matmulnbits`` is the default.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.anatomy import Linear
from rptq_onnx.quant import QuantizedWeight, pack_uint4
from rptq_onnx.vocabulary import WEIGHT_PREFIX, uint_container
from rptq_onnx.vocabulary import storage_bits as nbits_kernel_bits  # MatMulNBits' bits attribute: 4 or 8

MATMULNBITS_BLOCKS = (16, 32, 64, 128, 256)
PER_CHANNEL_BLOCKS = (128, 64, 32, 16, 256)  # per-channel codes: the first that divides the input size
# 8-bit MatMulNBits: quantize the input to int8 per block and multiply in integers; at the default level 0
# the CPU kernel dequantizes the whole weight on every call (≈ 10× slower than a float MatMul)
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


def _matmulnbits_form(node: onnx.NodeProto, lin: Linear, qw: QuantizedWeight, prefix: str, g: onnx.GraphProto):
    n, k = qw.codes.shape
    bs = matmulnbits_block(qw)
    blocks = k // bs
    scale, zp = qw.scale, qw.zero_point  # [N, groups]; per channel: one group, repeated over the blocks
    if qw.group_size is None:
        scale, zp = np.repeat(scale, blocks, axis=1), np.repeat(zp, blocks, axis=1)
    bits = nbits_kernel_bits(qw.bits)
    codes = np.ascontiguousarray(qw.codes.reshape(n, blocks, bs).astype(np.uint8))
    if bits == 4:
        codes, zp = pack_uint4(codes), pack_uint4(zp)  # [N, K/bs, bs/2], [N, ceil(K/bs / 2)]
    g.initializer.append(numpy_helper.from_array(codes, f"{prefix}.B"))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scale.astype(np.float32).reshape(-1)),
                                                 f"{prefix}.scales"))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(zp.astype(np.uint8)), f"{prefix}.zero_points"))
    out = node.output[0]
    mm_out = out if node.op_type == "MatMul" or not lin.bias else f"{prefix}.matmul"
    attrs = {"accuracy_level": INT8_ACCURACY_LEVEL} if bits == 8 else {}
    new = [helper.make_node("MatMulNBits", [node.input[0], f"{prefix}.B", f"{prefix}.scales", f"{prefix}.zero_points"],
                            [mm_out], name=f"{prefix}.matmulnbits", domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=bs, **attrs)]
    if node.op_type == "Gemm" and lin.bias:
        new.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{prefix}.bias"))
    return new


def quantize_weights(model: onnx.ModelProto, weights: dict[str, tuple[Linear, QuantizedWeight]],
                     form: str = "dq") -> tuple[onnx.ModelProto, dict]:
    """Replace each linear's float weight (``weights``: node name → (Linear, QuantizedWeight))."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    report = {"dq": 0, "matmulnbits": 0}
    replaced: dict[str, list[onnx.NodeProto]] = {}
    before: dict[str, list[onnx.NodeProto]] = {}
    nodes = {n.name: n for n in g.node}
    for name, (lin, qw) in weights.items():
        node = nodes[name]
        prefix = f"{WEIGHT_PREFIX}{name}"
        if form == "matmulnbits" and matmulnbits_ok(qw):
            replaced[name] = _matmulnbits_form(node, lin, qw, prefix, g)
            report["matmulnbits"] += 1
        else:
            before[name] = [_dq_form(g, node, lin, qw, prefix)]
            report["dq"] += 1
    ordered = []
    for node in g.node:
        ordered.extend(before.get(node.name, []))
        ordered.extend(replaced.get(node.name, [node]))
    del g.node[:]
    g.node.extend(ordered)
    if report["matmulnbits"] and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(out)
    return out, report


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)

