"""Pass: keep the KV cache in low bits between decode steps (present out, past in).

Each layer's ``past_key_values.N.key/value`` input and ``present.N.key/value`` output change
from float [batch, heads, tokens, head_dim] to integer codes in the *channel-major* layout
[batch, heads·head_dim, tokens]:

    past (uint4) ─ DequantizeLinear(axis=1) ─ Reshape [B,H,D,T] ─ Transpose ─┐
                                                                new K/V ─ Concat ─ attention
                                          present (uint4) ─ QuantizeLinear ─ Reshape ─ Transpose ─┘

Why this layout: the scales are per head *and* channel (the R2 / R3 clusters), and ONNX per-axis
Q/DQ takes a 1-D scale on one axis; with the H·D channels as one axis the per-cluster scale
vector of the k / v activation point applies unchanged. Channels go *before* tokens because ORT's
CPU per-axis kernels are fast only when each scale covers a contiguous run: quantizing an
8×1024×768 cache took 100 ms per tensor with the channels last and 5 ms with them first
(uint4; DequantizeLinear 26 → 9 ms). ``Concat`` does not accept 4-bit types, so the cache is
concatenated in float and quantized again for the present. That re-quantization is lossless:
the new K/V were already fake-quantized with the same static scales, and the past was
dequantized from them, so every value sits on the grid.

Containers: up to 4 bits → uint4 (ONNX packs two per byte; 3-bit codes are 0..7 in uint4),
5–8 bits → uint8. The cache is genuinely stored in low bits; the attention math that reads it
still runs in float after the DequantizeLinear.
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
from rptq_onnx.vocabulary import KV_PREFIX, uint_container


LAYOUT = "[batch, heads*head_dim, tokens]"
TO_CACHE_PERM = [0, 1, 3, 2]  # [B, H, T, D] ↔ [B, H, D, T] (its own inverse)


@dataclass(frozen=True)
class CacheTensor:
    """One cached tensor of one layer: its past input, present output and per-channel qparams."""

    tag: str  # e.g. "L3.k"
    past: str
    present: str
    heads: int
    head_dim: int
    qparams: QParams  # one entry per channel of [heads·head_dim], in the graph's channel order


@dataclass
class KvCacheReport:
    tensors: int = 0
    bits: list[int] = field(default_factory=list)
    layout: str = LAYOUT
    containers: list[str] = field(default_factory=list)  # ONNX element types, e.g. "UINT4"


class QuantizeKvCache(Pass[KvCacheReport]):
    """Cache inputs/outputs as low-bit codes (edits in place)."""

    name = "quantize_kv_cache"

    def __init__(self, caches: list[CacheTensor]):
        self.caches = caches

    def requires(self, model: onnx.ModelProto) -> str | None:
        inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
        for c in self.caches:
            if c.past not in inputs or c.present not in outputs:
                return f"{c.tag}: {c.past} / {c.present} are not a graph input / output"
            if c.qparams.scale.shape != (c.heads * c.head_dim,):
                return f"{c.tag}: {c.qparams.scale.shape[0]} scales for {c.heads * c.head_dim} cache channels"
        return None

    def apply(self, model: onnx.ModelProto) -> PassResult[KvCacheReport]:
        g = model.graph
        index = GraphIndex(model)
        inputs = {i.name: i for i in g.input}
        outputs = {o.name: o for o in g.output}
        before: list[onnx.NodeProto] = []  # dequantize the past: needed before anything reads it
        after: dict[str, list[onnx.NodeProto]] = {}  # quantize the present: right after its producer
        caches = self.caches
        report = KvCacheReport(bits=sorted({c.qparams.bits for c in caches}),
                               containers=sorted({onnx.TensorProto.DataType.Name(uint_container(c.qparams.bits))
                                                  for c in caches}))
        for c in caches:
            channels = c.heads * c.head_dim
            elem = uint_container(c.qparams.bits)
            p = f"{KV_PREFIX}{c.tag}"
            g.initializer.extend([
                numpy_helper.from_array(c.qparams.scale.astype(np.float32), f"{p}.scale"),
                helper.make_tensor(f"{p}.zero_point", elem, [channels], c.qparams.zero_point.astype(np.int64).tolist()),
                numpy_helper.from_array(np.array([0, c.heads, c.head_dim, -1], np.int64), f"{p}.heads_shape"),
                numpy_helper.from_array(np.array([0, channels, -1], np.int64), f"{p}.flat_shape"),
            ])

            # past: codes [B, C, T] → float [B, H, T, D] for the graph's original readers
            past_float = f"{p}.past"
            rename_inputs(index.consumers.get(c.past, []), {c.past: past_float})
            before += [
                helper.make_node("DequantizeLinear", [c.past, f"{p}.scale", f"{p}.zero_point"], [f"{p}.past_channels"],
                                 name=f"{p}.past.dequantize", axis=1),
                helper.make_node("Reshape", [f"{p}.past_channels", f"{p}.heads_shape"], [f"{p}.past_heads"],
                                 name=f"{p}.past.reshape"),
                helper.make_node("Transpose", [f"{p}.past_heads"], [past_float], name=f"{p}.past.transpose",
                                 perm=TO_CACHE_PERM),
            ]
            _retype(inputs[c.past], elem, ["batch", channels, "past"])

            # present: the float concat result [B, H, T, D] → codes [B, C, T]
            present_float = f"{p}.present"
            producer = index.producer[c.present]
            producer.output[list(producer.output).index(c.present)] = present_float
            rename_inputs(index.consumers.get(c.present, []), {c.present: present_float})
            after[present_float] = [
                helper.make_node("Transpose", [present_float], [f"{p}.present_heads"], name=f"{p}.present.transpose",
                                 perm=TO_CACHE_PERM),
                helper.make_node("Reshape", [f"{p}.present_heads", f"{p}.flat_shape"], [f"{p}.present_channels"],
                                 name=f"{p}.present.reshape"),
                helper.make_node("QuantizeLinear", [f"{p}.present_channels", f"{p}.scale", f"{p}.zero_point"], [c.present],
                                 name=f"{p}.present.quantize", axis=1),
            ]
            _retype(outputs[c.present], elem, ["batch", channels, "total"])
            report.tensors += 1

        stale = {c.past for c in caches} | {c.present for c in caches}
        kept = [vi for vi in g.value_info if vi.name not in stale]
        del g.value_info[:]
        g.value_info.extend(kept)
        insert_nodes(g, after, first=before)
        return PassResult(model, report, modified=bool(caches))


def quantize_kv_cache(model: onnx.ModelProto, caches: list[CacheTensor]) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` whose cache inputs/outputs are low-bit codes; returns (model, report)."""
    result = QuantizeKvCache(caches).run(model)
    return result.model, dataclasses.asdict(result.report)


def _retype(value: onnx.ValueInfoProto, elem: int, dims: list) -> None:
    t = value.type.tensor_type
    t.elem_type = elem
    t.shape.Clear()
    for d in dims:
        dim = t.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = d
