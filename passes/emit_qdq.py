"""Pass: per-cluster activation fake quantization as QuantizeLinear → DequantizeLinear pairs.

A cluster's scale/zero point is repeated over its channels, giving a 1-D per-channel Q/DQ on
``axis=-1`` (blocked quantization cannot express unequal clusters). Containers: uint8 for 8
bits, uint4 for 4 bits, and uint8 with a ``Clip(0, 2ⁿ−1)`` between Q and DQ for the other
widths (3, 5–7 bits). Every reader of the tensor is moved to the dequantized value.

On ONNX Runtime's CPU and CUDA providers this is *simulated* quantization: the values are
rounded to the low-bit grid, but the following MatMul still runs in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.graph import GraphIndex, insert_nodes, rename_inputs
from rptq_onnx.quant import QParams


@dataclass(frozen=True)
class QuantPoint:
    """Fake-quantize ``tensor`` with ``qparams``; ``tag`` names the nodes (e.g. ``L3.R1``)."""

    tag: str
    tensor: str
    qparams: QParams
    per_tensor: bool = False  # a scalar scale/zero point (the softmax output's fixed 1/255)

    def dequantized(self) -> str:
        return f"rptq.qdq.{self.tag}.dq"


def container(bits: int) -> tuple[int, bool]:
    """(ONNX element type, needs Clip) for an n-bit unsigned grid."""
    if bits == 8:
        return onnx.TensorProto.UINT8, False
    if bits == 4:
        return onnx.TensorProto.UINT4, False
    if 2 <= bits < 8:
        return onnx.TensorProto.UINT8, True
    raise ValueError(f"unsupported activation bit width {bits}")


def emit_qdq(model: onnx.ModelProto, points: list[QuantPoint]) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with a Q/DQ pair at every point; returns (model, report)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    index = GraphIndex(out)
    readers = {p.tensor: list(index.consumers.get(p.tensor, [])) for p in points}
    outputs = {o.name for o in g.output}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    report = {"points": 0, "by_bits": {}}
    for p in points:
        if p.tensor in outputs:
            raise ValueError(f"{p.tensor} is a graph output; quantize it in the KV-cache pass instead")
        elem, clip = container(p.qparams.bits)
        prefix = f"rptq.qdq.{p.tag}"
        scale = p.qparams.scale.astype(np.float32)
        zp = p.qparams.zero_point
        if p.per_tensor:
            scale, zp = scale[:1].reshape(()), zp[:1].reshape(())
        g.initializer.append(numpy_helper.from_array(scale, f"{prefix}.scale"))
        g.initializer.append(helper.make_tensor(f"{prefix}.zero_point", elem, list(np.shape(zp)),
                                                np.asarray(zp).astype(np.int64).ravel().tolist()))
        axis = {} if p.per_tensor else {"axis": -1}
        q_out = f"{prefix}.q"
        nodes = [helper.make_node("QuantizeLinear", [p.tensor, f"{prefix}.scale", f"{prefix}.zero_point"], [q_out],
                                  name=f"{prefix}.quantize", **axis)]
        if clip:
            g.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), f"{prefix}.lo"))
            g.initializer.append(numpy_helper.from_array(np.array(p.qparams.qmax, np.uint8), f"{prefix}.hi"))
            nodes.append(helper.make_node("Clip", [q_out, f"{prefix}.lo", f"{prefix}.hi"], [f"{prefix}.qc"],
                                          name=f"{prefix}.clip"))
            q_out = f"{prefix}.qc"
        nodes.append(helper.make_node("DequantizeLinear", [q_out, f"{prefix}.scale", f"{prefix}.zero_point"],
                                      [p.dequantized()], name=f"{prefix}.dequantize", **axis))
        rename_inputs(readers[p.tensor], {p.tensor: p.dequantized()})
        new_nodes[p.tensor] = nodes
        report["points"] += 1
        report["by_bits"][str(p.qparams.bits)] = report["by_bits"].get(str(p.qparams.bits), 0) + 1
    insert_nodes(g, new_nodes)  # each Q/DQ group right after the producer of its tensor
    return out, report
