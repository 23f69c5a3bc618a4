"""Pass: fold the RPTQ channel reorders into initializers, so clusters are contiguous for free.

Per layer, with ``index`` the new → old channel map of each point's ClusterPlan:

    R2  q_proj, k_proj: output columns + bias  (one permutation within heads; QKᵀ unchanged)
    R3  v_proj: output columns + bias; out_proj: input rows
    R5  fc1: output columns + bias; fc2: input rows
    R1  (contiguous layout) LN γ/β permuted, a Gather(axis=-1) on the LN input, q/k/v input rows
    R4  (contiguous layout) LN γ/β permuted, a Gather(axis=-1) on the LN input, fc1 input rows

The residual stream stays in the original channel order, which is why R1/R4 need the Gather
in the contiguous layout; it is the only runtime cost of reordering. In the ``zero-copy``
layout (default) R1/R4 stay in the original order: per-channel Q/DQ parameters do not need
contiguous clusters, so those points keep their cluster plan as labels only.

K and V in ``present.N.key/value`` come out in the permuted channel order (consistently with
``past_key_values``, so a cache round-trips unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.anatomy import Linear, Norm, OptLayer
from rptq_onnx.clustering import ClusterPlan
from rptq_onnx.graph import GraphIndex


@dataclass
class FoldReport:
    layout: str
    gathers: int = 0
    permuted_initializers: int = 0
    copied_shared: list[str] = field(default_factory=list)


class _Initializers:
    """Read/replace initializers; a tensor read by more than one node is copied first."""

    def __init__(self, model: onnx.ModelProto, report: FoldReport):
        self.model = model
        self.report = report
        self.index = GraphIndex(model)
        self.by_name = {t.name: t for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self.copies: set[str] = set()

    def get(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.by_name[name])

    def update(self, node_name: str, slot: int, source: str, fn) -> None:
        """Set ``node``'s input ``slot`` (initially the initializer ``source``) to ``fn(value)``.

        Other readers of ``source`` are never affected: a shared tensor is copied for this node
        (once; later updates of the same input modify that copy).
        """
        node = self.nodes[node_name]
        current = node.input[slot]
        if current in self.copies:
            target = current
        elif len(self.index.readers_of_initializer(source)) == 1 and current == source:
            target = source
        else:
            target = f"{source}.rptq.{node_name}"
            self.copies.add(target)
            self.report.copied_shared.append(source)
        value = fn(self.get(current if current in self.copies else source))
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), target)
        if target in self.by_name:
            self.by_name[target].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.by_name[target] = self.model.graph.initializer[-1]
        node.input[slot] = target
        self.report.permuted_initializers += 1


def _permute_output(inits: _Initializers, lin: Linear, index: np.ndarray) -> None:
    if lin.weight_layout == "out_in":
        inits.update(lin.node, 1, lin.weight, lambda w: w[index, :])
    else:
        inits.update(lin.node, 1, lin.weight, lambda w: w[:, index])
    if lin.bias and lin.bias_node:
        add = inits.nodes[lin.bias_node]
        slot = next(i for i, t in enumerate(add.input) if inits.index.constant_source(t) == lin.bias)
        inits.update(lin.bias_node, slot, lin.bias, lambda b: b[index])
    elif lin.bias:
        inits.update(lin.node, 2, lin.bias, lambda b: b[index])


def _permute_input(inits: _Initializers, lin: Linear, index: np.ndarray) -> None:
    if lin.weight_layout == "out_in":
        inits.update(lin.node, 1, lin.weight, lambda w: w[:, index])
    else:
        inits.update(lin.node, 1, lin.weight, lambda w: w[index, :])


def _permute_norm(inits: _Initializers, norm: Norm, index: np.ndarray, tag: str) -> None:
    """Permute γ/β and gather the LN input so the LN output comes out in the new order."""
    inits.update(norm.node, 1, norm.weight, lambda g: g[index])
    if norm.bias:
        inits.update(norm.node, 2, norm.bias, lambda b: b[index])
    idx_name, gathered = f"rptq.reorder.{tag}.index", f"rptq.reorder.{tag}.input"
    inits.model.graph.initializer.append(numpy_helper.from_array(index.astype(np.int64), idx_name))
    gather = helper.make_node("Gather", [norm.input, idx_name], [gathered], axis=-1, name=f"rptq.reorder.{tag}.gather")
    node = inits.nodes[norm.node]
    if norm.gather is not None:
        raise ValueError(f"{norm.node} is already reordered (Gather {norm.gather}); fold reorders into an uncompiled graph")
    node.input[0] = gathered
    graph_nodes = inits.model.graph.node
    pos = next(i for i, n in enumerate(graph_nodes) if n.name == norm.node)
    graph_nodes.insert(pos, gather)
    inits.report.gathers += 1


def fold_reorder(model: onnx.ModelProto, layers: list[OptLayer], plans: list[dict[str, ClusterPlan]],
                 layout: str = "zero-copy") -> tuple[onnx.ModelProto, FoldReport]:
    """A reordered copy of ``model`` computing the same function; ``model`` is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = FoldReport(layout=layout)
    inits = _Initializers(out, report)
    for layer, plan in zip(layers, plans):
        i = layer.index
        if "R2" in plan:
            for lin in (layer.q_proj, layer.k_proj):
                _permute_output(inits, lin, plan["R2"].index)
        if "R3" in plan:
            _permute_output(inits, layer.v_proj, plan["R3"].index)
            _permute_input(inits, layer.out_proj, plan["R3"].index)
        if "R5" in plan:
            _permute_output(inits, layer.fc1, plan["R5"].index)
            _permute_input(inits, layer.fc2, plan["R5"].index)
        if layout == "contiguous":
            if "R1" in plan:
                _permute_norm(inits, layer.attn_norm, plan["R1"].index, f"L{i}.R1")
                for lin in (layer.q_proj, layer.k_proj, layer.v_proj):
                    _permute_input(inits, lin, plan["R1"].index)
            if "R4" in plan:
                _permute_norm(inits, layer.final_norm, plan["R4"].index, f"L{i}.R4")
                _permute_input(inits, layer.fc1, plan["R4"].index)
    return out, report
