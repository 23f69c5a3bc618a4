"""Pass: each decomposed RMSNorm as one ``SimplifiedLayerNormalization`` (ONNX Runtime's fused kernel).

A Llama-family export spells RMSNorm as seven nodes,

    γ · (x · Reciprocal(Sqrt(ReduceMean(Pow(x, 2), axes=[-1]) + ε)))

61 of them in SmolLM2, each a kernel dispatch per decode step. ``SimplifiedLayerNormalization`` (ORT's
contrib op in the default domain, the form GenAI's builder writes) computes the same in one kernel.
Compile runs it on fused-attention graphs, the deployment form; eager graphs keep the decomposed norm
that ``find_layers`` walks (``rptq-onnx inspect --error`` reads compiled eager graphs again).

A norm whose input is a residual sum ``a + b`` of two tensors of one declared shape becomes
``com.microsoft:SkipSimplifiedLayerNormalization(a, b, γ)``, which also returns the sum for the next
residual (the builder's form): one node for Add and norm.

A norm is replaced only when its inner tensors have no other reader and ε and the exponent are
constants; anything else is left as it is (and counted in ``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rptq_onnx.graph import GraphIndex, declared_shape, prune_dead_nodes
from rptq_onnx.passes.base import Pass, PassResult

_CHAIN = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul")  # after the Pow


@dataclass
class NormsReport:
    fused: int = 0  # RMSNorms now one (Skip)SimplifiedLayerNormalization
    with_residual: int = 0  # of those, SkipSimplifiedLayerNormalization taking the residual Add too
    skipped: int = 0  # x² → ReduceMean chains left as they were


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = index.constant_value(name) if index.is_constant(name) else None
    return float(np.asarray(value).reshape(-1)[0]) if value is not None and np.size(value) == 1 else None


def _residual_sum(index: GraphIndex, g: onnx.GraphProto, x: str) -> onnx.NodeProto | None:
    """The Add making ``x`` from two tensors of one declared shape (a residual sum), else None."""
    add = index.producer.get(x)
    if add is None or add.op_type != "Add" or len(add.input) != 2 or any(index.is_constant(t) for t in add.input):
        return None
    shapes = [declared_shape(g, t) for t in add.input]
    return add if shapes[0] is not None and shapes[0] == shapes[1] and len(shapes[0]) == 3 else None


def _other(node: onnx.NodeProto, tensor: str) -> str:
    return next(t for t in node.input if t != tensor)


def _rms_norm(index: GraphIndex, pow_node: onnx.NodeProto, outputs: set[str]) -> tuple[list[onnx.NodeProto], str, float] | None:
    """(the seven nodes, γ, ε) of the RMSNorm starting at ``pow_node``, or None where it is not one (``outputs``:
    the graph's, which no inner tensor may be)."""
    x = pow_node.input[0]
    if _scalar(index, pow_node.input[1]) != 2.0:
        return None
    chain, tensor = [pow_node], pow_node.output[0]
    for op in _CHAIN:
        readers = index.consumers.get(tensor, [])
        if len(readers) != 1 or readers[0].op_type != op or tensor in outputs:
            return None
        chain.append(readers[0])
        tensor = readers[0].output[0]
    mean, add, _, reciprocal, scaled, weighted = chain[1:]
    axes = index.constant_value(mean.input[1]) if len(mean.input) > 1 else None
    keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
    eps = _scalar(index, _other(add, mean.output[0]))
    gamma = _other(weighted, scaled.output[0])
    shape = index.constant_shape(gamma) if index.is_constant(gamma) else None
    if (axes is None or list(np.asarray(axes).reshape(-1)) != [-1] or not keepdims or eps is None
            or _other(scaled, reciprocal.output[0]) != x
            or shape is None or len(shape) != 1):
        return None
    return chain, gamma, eps


class FuseNorms(Pass[NormsReport]):
    """Replace every decomposed RMSNorm by SimplifiedLayerNormalization (edits in place)."""

    name = "fuse_norms"

    def apply(self, model: onnx.ModelProto) -> PassResult[NormsReport]:
        g = model.graph
        index = GraphIndex(model)
        report = NormsReport()
        replaced: dict[str, onnx.NodeProto | None] = {}  # by output tensor (None: removed)
        outputs = {o.name for o in g.output}
        for node in [n for n in g.node if n.op_type == "Pow"]:
            found = _rms_norm(index, node, outputs)
            if found is None:
                report.skipped += any(r.op_type == "ReduceMean" for r in index.consumers.get(node.output[0], []))
                continue
            chain, gamma, eps = found
            name, x, y = f"{chain[-1].name or chain[-1].output[0]}.rms_norm", node.input[0], chain[-1].output[0]
            add = _residual_sum(index, g, x)
            if add is not None:
                replaced[x] = None  # the Add: the fused node returns the sum as its 4th output
                replaced[y] = helper.make_node("SkipSimplifiedLayerNormalization", [*add.input, gamma], [y, "", "", x],
                                               name=name, domain="com.microsoft", epsilon=eps)
                report.with_residual += 1
            else:
                replaced[y] = helper.make_node("SimplifiedLayerNormalization", [x, gamma], [y], name=name, axis=-1,
                                               epsilon=eps)
            report.fused += 1
        if replaced:
            kept = [replaced.get(n.output[0], n) if n.output else n for n in g.node]
            del g.node[:]
            g.node.extend(n for n in kept if n is not None)
            prune_dead_nodes(model)  # (also puts the nodes back in topological order)
            if report.with_residual and not any(o.domain == "com.microsoft" for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return PassResult(model, report, modified=bool(replaced))
