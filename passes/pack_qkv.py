"""Pass: q, k and v of each fused attention as one MatMulNBits feeding GroupQueryAttention's packed input.

After ``fuse_attention`` each GQA node reads three linears of one tensor x, each a chain

    MatMulNBits(x) [+ offset term] [+ constant]* [× constant scalar, q only]

(the offset term Σ_b offset[n, b]·Σ_{k∈b} x_k carries a kept Q4_1 grid; the constants are biases
and the K/V zero points ``fuse_attention`` moved out of the cache's symmetric grid; the scalar is
OPT's 1/√d on q). They become one MatMulNBits over the rows of all three (N = Nq + Nk + Nv), its
bias input holding the constants, one offset MatMul over the concatenated offsets, and GQA's
``query`` = [q | k | v] with ``key``/``value`` empty; q's scalar joins GQA's ``scale``. The codes,
scales and zero points are the same bytes, reordered by rows, so the result equals the three
linears up to float summation order; a decode step runs 2 MatMulNBits, 2 offset MatMuls and up to
5 Adds fewer per layer.

A layer is left as it is (and counted in ``skipped``) when its chains do not have that form (a
3-bit K/V keeps its Q/DQ before GQA; explicit RoPE rotates q and k there) or its three kernels
differ in input, K, bits, block size, accuracy level or zero-point presence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.graph import GraphIndex, node_attr, prune_dead_nodes
from rptq_onnx.passes.base import Pass, PassResult
from rptq_onnx.vocabulary import ATTENTION_PREFIX, OFFSET_ADD_SUFFIX

_SAME = ("K", "bits", "block_size", "accuracy_level")  # attributes the three kernels must share


@dataclass
class PackReport:
    layers: int = 0  # GQA nodes reading one packed q/k/v MatMulNBits
    skipped: int = 0  # GQA nodes left with three linears

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Chain:
    """One of q/k/v: its MatMulNBits, the constants added to it and q's scalar (initializer names), and its
    offset term (the block-sums tensor, the offset [K/bs, N] initializer). Names only: a layer-wise
    compile finds what to read back from disk before anything is read."""

    kernel: onnx.NodeProto
    n: int
    adds: list[str] = field(default_factory=list)
    scalar: str | None = None
    offset: tuple[str, str] | None = None

    @property
    def reads(self) -> set[str]:
        return ({t for t in self.kernel.input[1:] if t} | set(self.adds) | ({self.offset[1]} if self.offset else set())
                | ({self.scalar} if self.scalar else set()))


def _attrs(node: onnx.NodeProto) -> dict:
    """All of a node's attributes (to copy them onto the packed kernel)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _size(index: GraphIndex, name: str) -> int | None:
    """Elements of a constant of rank ≤ 1 (read from its dims where it is an initializer), else None."""
    tensor = index.initializers.get(name)
    dims = list(tensor.dims) if tensor is not None else list(np.shape(index.constant_value(name)))
    return int(np.prod(dims)) if len(dims) <= 1 else None


def _chain(index: GraphIndex, tensor: str, scalar_ok: bool) -> _Chain | None:
    """The chain ending in ``tensor`` (read by GQA only), or None if it is not of the packable form."""
    adds, scalar, offset = [], None, None
    node = index.producer.get(tensor)
    for _ in range(8):
        if node is None or len(index.consumers.get(node.output[0], [])) != 1:
            return None
        consts = [t for t in node.input if index.is_constant(t)]
        data = [t for t in node.input if t not in consts]
        if node.op_type == "MatMulNBits":
            if len(node.input) > 4 and any(node.input[4:]):  # g_idx or a bias already
                return None
            n = node_attr(node, "N", None)
            if any(_size(index, t) not in (1, n) for t in adds):
                return None
            return _Chain(node, n, adds, scalar, offset)
        if len(data) != 1:
            if node.op_type == "Add" and node.name.endswith(OFFSET_ADD_SUFFIX) and offset is None:
                term = next((index.producer[t] for t in node.input if t in index.producer
                             and index.producer[t].op_type == "MatMul" and index.is_constant(index.producer[t].input[1])),
                            None)
                if term is None:
                    return None
                offset = (term.input[0], term.input[1])
                node = index.producer.get(next(t for t in node.input if t != term.output[0]))
                continue
            return None
        if len(consts) != 1 or _size(index, consts[0]) is None:
            return None
        if node.op_type == "Add":
            adds.append(consts[0])
        elif node.op_type == "Mul" and scalar_ok and _size(index, consts[0]) == 1 and not adds and offset is None:
            scalar = consts[0]  # q × c: GQA's scale takes c
        else:
            return None
        node = index.producer.get(data[0])
    return None


def _chains(index: GraphIndex, gqa: onnx.NodeProto) -> list[_Chain] | None:
    """q/k/v's chains when the three can share one kernel, else None."""
    if len(gqa.input) < 3 or not all(gqa.input[:3]):
        return None
    chains = [_chain(index, t, scalar_ok=i == 0) for i, t in enumerate(gqa.input[:3])]
    if any(c is None for c in chains):
        return None
    kernels = [c.kernel for c in chains]
    if len({k.input[0] for k in kernels}) != 1 or len({tuple(node_attr(k, a, 0) for a in _SAME) for k in kernels}) != 1:
        return None
    if len({len(k.input) > 3 and bool(k.input[3]) for k in kernels}) != 1:
        return None
    if len({c.offset[0] for c in chains if c.offset}) > 1:  # one block-sums tensor (one x)
        return None
    return chains


def initializers_read(model: onnx.ModelProto, gqa_name: str) -> set[str]:
    """The initializers packing ``gqa_name``'s q/k/v would read (for a caller holding weights on disk)."""
    index = GraphIndex(model)
    chains = _chains(index, index.node_by_name[gqa_name])
    return set().union(*(c.reads for c in chains)) if chains else set()


def _pack(model: onnx.ModelProto, index: GraphIndex, gqa: onnx.NodeProto, chains: list[_Chain]) -> None:
    g = model.graph
    p = f"{ATTENTION_PREFIX}{gqa.name.removeprefix(ATTENTION_PREFIX).removesuffix('.gqa')}.qkv"
    kernels = [c.kernel for c in chains]
    first = kernels[0]
    arrays = [[np.asarray(index.constant_value(t)) for t in k.input[1:4] if t] for k in kernels]
    names = [f"{p}.B", f"{p}.scales", f"{p}.zero_points"][:len(arrays[0])]
    for slot, name in enumerate(names):  # rows of q, then k, then v: B [N, K/bs, bs/2], scales [N·K/bs], zp [N, …]
        g.initializer.append(numpy_helper.from_array(np.concatenate([a[slot] for a in arrays]), name))
    bias = [sum((np.asarray(index.constant_value(t), np.float32) for t in c.adds), np.zeros(c.n, np.float32))
            for c in chains]
    g.initializer.append(numpy_helper.from_array(np.concatenate(bias).astype(np.float32), f"{p}.bias"))
    inputs = [first.input[0], *names[:2], names[2] if len(names) > 2 else "", "", f"{p}.bias"]
    attrs = {**_attrs(first), "N": sum(c.n for c in chains)}
    offsets = [c for c in chains if c.offset]
    out = f"{p}.packed"
    nodes = [helper.make_node("MatMulNBits", inputs, [out if offsets else f"{p}.out"], name=f"{p}.matmulnbits",
                              domain="com.microsoft", **attrs)]
    if offsets:
        sums = offsets[0].offset[0]
        blocks = node_attr(first, "K", None) // node_attr(first, "block_size", None)
        matrix = np.concatenate([np.asarray(index.constant_value(c.offset[1]), np.float32) if c.offset
                                 else np.zeros((blocks, c.n), np.float32) for c in chains], 1)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(matrix), f"{p}.offset"))
        nodes += [helper.make_node("MatMul", [sums, f"{p}.offset"], [f"{p}.offset_term"], name=f"{p}.offset_term"),
                  helper.make_node("Add", [out, f"{p}.offset_term"], [f"{p}.out"], name=f"{p}{OFFSET_ADD_SUFFIX}")]
    if chains[0].scalar is not None:  # GQA's scale (default 1/√head_size) takes q's factor
        factor = float(np.asarray(index.constant_value(chains[0].scalar)).reshape(-1)[0])
        scale = node_attr(gqa, "scale", (chains[0].n // node_attr(gqa, "num_heads", None)) ** -0.5)
        kept = [a for a in gqa.attribute if a.name != "scale"]
        del gqa.attribute[:]
        gqa.attribute.extend([*kept, helper.make_attribute("scale", float(scale * factor))])
    gqa.input[0], gqa.input[1], gqa.input[2] = f"{p}.out", "", ""
    at = list(g.node).index(gqa)
    for node in reversed(nodes):
        g.node.insert(at, node)


class PackQKV(Pass[PackReport]):
    """Each GQA node's q/k/v linears as one packed MatMulNBits (edits in place); ``gqa_names``: only those."""

    name = "pack_qkv"

    def __init__(self, gqa_names: list[str] | None = None):
        self.gqa_names = gqa_names

    def apply(self, model: onnx.ModelProto) -> PassResult[PackReport]:
        report = PackReport()
        targets = [n.name for n in model.graph.node if n.op_type == "GroupQueryAttention"
                   and (self.gqa_names is None or n.name in self.gqa_names)]
        for name in targets:
            index = GraphIndex(model)
            gqa = index.node_by_name[name]
            chains = _chains(index, gqa)
            if chains is None:
                report.skipped += 1
                continue
            _pack(model, index, gqa, chains)
            report.layers += 1
        if report.layers:
            prune_dead_nodes(model)
        return PassResult(model, report, modified=bool(report.layers))


def pack_qkv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with packed q/k/v (``PackQKV``); returns (model, report)."""
    result = PackQKV().run(model)
    return result.model, result.report.as_dict()
