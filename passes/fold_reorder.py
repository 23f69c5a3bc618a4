"""Pass: fold the RPTQ channel reorders into initializers, so clusters are contiguous for free.

Per layer, with ``index`` the new → old channel map of each point's ClusterPlan (R2/R3 plans
are per K/V head; query heads use their K/V head's order, ``ClusterPlan.expand_heads``):

    R2  q_proj, k_proj: output columns + bias  (one permutation within heads; QKᵀ unchanged)
    R3  v_proj: output columns + bias; out_proj: input rows
    R5  fc1 (and up_proj): output columns + bias; fc2: input rows
    R1  (contiguous layout) norm γ/β permuted, a Gather(axis=-1) on the norm's data, q/k/v input rows
    R4  (contiguous layout) norm γ/β permuted, a Gather(axis=-1) on the norm's data, fc1/up_proj rows

The residual stream stays in the original channel order, which is why R1/R4 need the Gather
in the contiguous layout (for an RMSNorm it sits right before the multiplication by γ). In the
``zero-copy`` layout (default) R1/R4 stay in the original order: per-channel Q/DQ parameters do
not need contiguous clusters, so those points keep their cluster plan as labels only.

RoPE (Llama) ties each channel of a head to a rotation frequency, so permuting q/k columns alone
would change the function, even when RoPE pairs (i, i + D/2) move together. An exact R2 reorder
must also permute the cos/sin tables: per layer, a Gather turns the shared [B, 1, S, D] tables
into [B, heads, S, D] ones in each head's order. That is a runtime copy, so Llama's R2 is folded
in the contiguous layout only; zero-copy keeps R2 as labels, like R1/R4.

K and V in ``present.N.key/value`` come out in the permuted channel order (consistently with
``past_key_values``, so a cache round-trips unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.anatomy import DecoderLayer, Linear, Norm, Rope
from rptq_onnx.clustering import ClusterPlan
from rptq_onnx.graph import GraphIndex
from rptq_onnx.passes.base import Pass, PassResult
from rptq_onnx.vocabulary import REORDER_PREFIX


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

    def constant(self, name: str, value: np.ndarray) -> str:
        """Add an initializer ``name`` (once; later calls reuse it)."""
        if name not in self.by_name:
            self.model.graph.initializer.append(numpy_helper.from_array(value, name))
            self.by_name[name] = self.model.graph.initializer[-1]
        return name

    def insert_before(self, node_name: str, nodes: list[onnx.NodeProto]) -> None:
        graph_nodes = self.model.graph.node
        pos = next(i for i, n in enumerate(graph_nodes) if n.name == node_name)
        for offset, node in enumerate(nodes):
            graph_nodes.insert(pos + offset, node)

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
    """Permute γ/β and gather the norm's data input so its output comes out in the new order."""
    inits.update(norm.node, norm.weight_input, norm.weight, lambda g: g[index])
    if norm.bias:
        inits.update(norm.node, 2, norm.bias, lambda b: b[index])
    if norm.gather is not None:
        raise ValueError(f"{norm.node} is already reordered (Gather {norm.gather}); fold reorders into an uncompiled graph")
    idx_name = inits.constant(f"{REORDER_PREFIX}{tag}.index", index.astype(np.int64))
    node = inits.nodes[norm.node]
    gathered = f"{REORDER_PREFIX}{tag}.input"
    gather = helper.make_node("Gather", [node.input[norm.data_input], idx_name], [gathered], axis=-1,
                              name=f"{REORDER_PREFIX}{tag}.gather")
    node.input[norm.data_input] = gathered
    inits.insert_before(norm.node, [gather])
    inits.report.gathers += 1


def _permute_rope(inits: _Initializers, rope: Rope, plan: ClusterPlan, tag: str) -> None:
    """Make the rotation follow a per-head channel order: each head's cos/sin in that order.

    The tables [B, 1, S, D] become [B, H, S, D]: Gather(axis=-1) with indices [H, D] gives
    [B, 1, S, H, D], then Transpose → [B, H, S, 1, D] and Squeeze.
    """
    per_head = plan.channels // plan.heads
    within = (plan.index.reshape(plan.heads, per_head) - per_head * np.arange(plan.heads)[:, None]).astype(np.int64)
    idx = inits.constant(f"{REORDER_PREFIX}{tag}.rope_index", within)
    axis = inits.constant(f"{REORDER_PREFIX}rope_squeeze_axis", np.array([3], np.int64))
    for which, mul, slot in (("cos", rope.cos_mul, rope.cos_input), ("sin", rope.sin_mul, rope.sin_input)):
        node = inits.nodes[mul]
        p = f"{REORDER_PREFIX}{tag}.{which}"
        nodes = [helper.make_node("Gather", [node.input[slot], idx], [f"{p}.gathered"], axis=-1, name=f"{p}.gather"),
                 helper.make_node("Transpose", [f"{p}.gathered"], [f"{p}.heads"], perm=[0, 3, 2, 1, 4],
                                  name=f"{p}.transpose"),
                 helper.make_node("Squeeze", [f"{p}.heads", axis], [f"{p}.table"], name=f"{p}.squeeze")]
        node.input[slot] = f"{p}.table"
        inits.insert_before(mul, nodes)
        inits.report.gathers += 1


def folded_points(layer: DecoderLayer, layout: str, keep_weight_inputs: bool = False) -> set[str]:
    """The points whose reorder is folded into the graph (the others are cluster labels only).

    ``keep_weight_inputs``: no reorder may permute a linear's inputs (weights kept on their source's
    block grid, rptq_onnx/source_grid.py), so R3 and R5 — out_proj's and fc2's inputs — stay labels."""
    free = set() if keep_weight_inputs else {"R3", "R5"}  # these permute initializers only
    free |= {"R2"} if layer.q_rope is None else set()  # q/k outputs
    return (free | {"R1", "R2", "R4"}) if layout == "contiguous" else free


class FoldReorder(Pass[FoldReport]):
    """Fold each layer's clustered reorders into its initializers (edits in place)."""

    name = "fold_reorder"

    def __init__(self, layers: list[DecoderLayer], plans: list[dict[str, ClusterPlan]], layout: str = "zero-copy",
                 keep_weight_inputs: bool = False):
        self.layers, self.plans, self.layout, self.keep_weight_inputs = layers, plans, layout, keep_weight_inputs

    def requires(self, model: onnx.ModelProto) -> str | None:
        """Its layers' weights loaded (others may stay on disk: a layer-wise compile folds one at a time),
        and none of its layers reordered before."""
        mine = {t for layer in self.layers for t in _layer_tensors(layer)}
        if any(t.name in mine and t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            return "the model's weights are not loaded (it was read without its external data)"
        tags = tuple(f"{REORDER_PREFIX}L{layer.index}." for layer in self.layers)
        if any(n.name.startswith(tags) for n in model.graph.node):
            return "the model is already reordered; fold reorders into an uncompiled graph"
        return None

    def apply(self, model: onnx.ModelProto) -> PassResult[FoldReport]:
        report = FoldReport(layout=self.layout)
        inits = _Initializers(model, report)
        for layer, plan in zip(self.layers, self.plans):
            i, group = layer.index, layer.group
            folded = folded_points(layer, self.layout, self.keep_weight_inputs)
            mlp_in = [lin for lin in (layer.fc1, layer.up_proj) if lin is not None]
            if "R2" in plan and "R2" in folded:
                _permute_output(inits, layer.q_proj, plan["R2"].expand_heads(group).index)
                _permute_output(inits, layer.k_proj, plan["R2"].index)
                if layer.q_rope is not None:
                    _permute_rope(inits, layer.q_rope, plan["R2"].expand_heads(group), f"L{i}.R2.q")
                    _permute_rope(inits, layer.k_rope, plan["R2"], f"L{i}.R2.k")
            if "R3" in plan and "R3" in folded:
                _permute_output(inits, layer.v_proj, plan["R3"].index)
                _permute_input(inits, layer.out_proj, plan["R3"].expand_heads(group).index)
            if "R5" in plan and "R5" in folded:
                for lin in mlp_in:
                    _permute_output(inits, lin, plan["R5"].index)
                _permute_input(inits, layer.fc2, plan["R5"].index)
            if "R1" in plan and "R1" in folded:
                _permute_norm(inits, layer.attn_norm, plan["R1"].index, f"L{i}.R1")
                for lin in (layer.q_proj, layer.k_proj, layer.v_proj):
                    _permute_input(inits, lin, plan["R1"].index)
            if "R4" in plan and "R4" in folded:
                _permute_norm(inits, layer.final_norm, plan["R4"].index, f"L{i}.R4")
                for lin in mlp_in:
                    _permute_input(inits, lin, plan["R4"].index)
        return PassResult(model, report, modified=bool(report.permuted_initializers or report.gathers))


def _layer_tensors(layer: DecoderLayer) -> list[str]:
    """The initializers a fold may permute: linear weights and biases, norm γ/β."""
    out = [t for lin in layer.linears().values() for t in (lin.weight, lin.bias) if t]
    return out + [t for norm in (layer.attn_norm, layer.final_norm) for t in (norm.weight, norm.bias) if t]


def fold_reorder(model: onnx.ModelProto, layers: list[DecoderLayer], plans: list[dict[str, ClusterPlan]],
                 layout: str = "zero-copy", keep_weight_inputs: bool = False) -> tuple[onnx.ModelProto, FoldReport]:
    """A reordered copy of ``model`` computing the same function; ``model`` is not modified.
    ``keep_weight_inputs``: see ``folded_points``."""
    result = FoldReorder(layers, plans, layout, keep_weight_inputs).run(model)
    return result.model, result.report
