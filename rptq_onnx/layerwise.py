"""Layer-wise calibration: the graph cut into a prologue and one subgraph per decoder layer, run in turn.

A decoder graph is a chain: the prologue (embeddings, the attention mask, rotary tables) makes the
residual stream that enters layer 0, and each layer turns the stream it receives into the next
one. ``LayerCut`` finds those stream tensors and the tensors every layer reads from the prologue
("side" tensors: masks, position tables). ``LayerStream`` runs the prologue once per calibration
batch, keeps the stream of every window in memory (``windows × seqlen × hidden`` floats, e.g.
134 MB for 32 × 512 tokens at hidden 2048) and runs one layer's subgraph at a time, with only
that layer's weights in ONNX Runtime. So calibration and GPTQ's Hessians never hold more than one
layer, and the next layer may see this layer's quantized outputs (``propagate="quantized"``, as
the reference calibrates) or its float outputs.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from rptq_onnx.anatomy import DecoderLayer
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex
from rptq_onnx.runtime import feeds_for, make_session, run_into


@dataclass(frozen=True)
class LayerCut:
    """``inputs[i]``: the residual stream entering layer i; ``outputs[i]``: the one leaving it
    (``outputs[i] == inputs[i + 1]``); ``side``: tensors of the prologue that layers read."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    side: tuple[str, ...]


def layer_output(index: GraphIndex, layer: DecoderLayer) -> str:
    """The residual Add after the layer's fc2 / down_proj: the stream leaving the last layer (the others
    end where the next one starts, maybe after a Reshape)."""
    adds = [n for n in index.value_readers(layer.fc2.output) if n.op_type == "Add"]
    if len(adds) != 1:
        raise RptqError(f"layer {layer.index}: no single residual Add after {layer.fc2.node}; "
                        "compile this graph with --whole-graph")
    return adds[0].output[0]


def find_cut(model: onnx.ModelProto, layers: list[DecoderLayer]) -> LayerCut:
    """Where ``model`` splits into prologue | layer 0 | … | layer L−1, or a one-line RptqError when a
    layer reads a tensor made by another layer (then only whole-graph calibration applies)."""
    index = GraphIndex(model)
    inputs = tuple(layer.attn_norm.input for layer in layers)
    outputs = (*inputs[1:], layer_output(index, layers[-1]))
    downstream = _descendants(model, inputs[0])
    graph_inputs = {i.name for i in model.graph.input}
    side: list[str] = []
    for i, layer in enumerate(layers):
        own = _descendants(model, inputs[i]) - {inputs[i]}
        boundary = _ancestors(model, [outputs[i]], stop=_Outside(own))[1]
        for tensor in (t for t in boundary if t not in graph_inputs and t != inputs[i]):
            if tensor in downstream:
                raise RptqError(f"layer {i} reads {tensor}, made by an earlier layer; "
                                "compile this graph with --whole-graph")
            if tensor not in downstream and tensor not in side:
                side.append(tensor)
    return LayerCut(inputs=inputs, outputs=outputs, side=tuple(side))


def _descendants(model: onnx.ModelProto, tensor: str) -> set[str]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    seen, todo = {tensor}, [tensor]
    while todo:
        for node in readers.get(todo.pop(), []):
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return seen


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def _ancestors(model: onnx.ModelProto, outputs: Iterable[str], stop: Container[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes needed for ``outputs`` (in graph order) and the tensors they read from outside: graph
    inputs and ``stop`` tensors (initializers are not listed)."""
    producer = _producers(model)
    initializers = {t.name for t in model.graph.initializer}
    needed, boundary, todo, seen = set(), [], list(outputs), set()
    while todo:
        tensor = todo.pop()
        if tensor in seen or not tensor or tensor in initializers:
            continue
        seen.add(tensor)
        node = None if tensor in stop else producer.get(tensor)
        if node is None:
            boundary.append(tensor)
            continue
        if id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
            for attr in node.attribute:  # tensors read inside subgraphs (If/Loop/Scan bodies)
                for graph in [attr.g, *attr.graphs]:
                    todo.extend(t for n in graph.node for t in n.input)
    return [n for n in model.graph.node if id(n) in needed], boundary


class _Outside:
    """The tensors not in ``inside`` (a stop set for ``_ancestors``)."""

    def __init__(self, inside: set[str]):
        self.inside = inside

    def __contains__(self, tensor: str) -> bool:
        return tensor not in self.inside


def subgraph(model: onnx.ModelProto, outputs: list[str], stop: Iterable[str], types: dict[str, int],
             name: str) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``stop`` tensors and graph inputs, as a model
    of its own (initializers shared by reference: external ones stay on disk). ``types``: element
    type of every ``stop`` tensor and output."""
    stop = set(stop)
    nodes, boundary = _ancestors(model, outputs, stop)
    read = {t for n in nodes for t in n.input} | set(outputs)
    declared = {i.name: i for i in model.graph.input}
    inputs = [declared[t] if t in declared else helper.make_tensor_value_info(t, types[t], None) for t in boundary]
    graph = helper.make_graph(nodes, name, inputs,
                              [helper.make_tensor_value_info(t, types[t], None) for t in outputs],
                              initializer=[t for t in model.graph.initializer if t.name in read])
    out = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return out


class _GraphInputs:
    """A session seen through the inputs the full graph has (for ``feeds_for``)."""

    def __init__(self, session, names: set[str]):
        self._inputs = [i for i in session.get_inputs() if i.name in names]

    def get_inputs(self):
        return self._inputs


class LayerStream:
    """Calibration windows as they flow through a graph, one decoder layer at a time.

    ``model``: the graph to run (a skeleton whose external weights stay in ``model_dir``; it may
    carry calibration taps). ``prologue`` runs once; then ``run(i, outputs)`` runs layer i on the
    current stream of every batch and ``advance(next)`` hands its output stream on.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[DecoderLayer], cut: LayerCut, windows: np.ndarray,
                 batch_size: int, model_dir: Path | None):
        self.layers, self.cut, self.model_dir = layers, cut, model_dir
        self.graph_inputs = {i.name for i in model.graph.input}
        self.batches = [windows[s:s + batch_size] for s in range(0, len(windows), batch_size)]
        self.types = {name: onnx.TensorProto.FLOAT for name in (*cut.inputs, *cut.outputs)}
        self.layer = 0
        prologue = subgraph(model, [cut.inputs[0], *cut.side], stop=(), types=self._side_types(model),
                            name="prologue")
        session = self._session(prologue)
        names = [o.name for o in session.get_outputs()]
        self.side: list[dict[str, np.ndarray]] = []
        self.stream: list[np.ndarray] = []
        for batch in self.batches:
            values = dict(zip(names, session.run(None, self._feeds(session, batch, {}))))
            self.stream.append(values.pop(cut.inputs[0]))
            self.side.append(values)

    def _side_types(self, model: onnx.ModelProto) -> dict[str, int]:
        from rptq_onnx.anatomy.shapes import elem_types

        types = elem_types(model)
        missing = [t for t in self.cut.side if t not in types]
        if missing:
            raise RptqError(f"the element type of {missing[0]} is unknown (ONNX shape inference); "
                            "compile this graph with --whole-graph")
        return {**types, **self.types}

    def _session(self, model: onnx.ModelProto):
        return make_session(model.SerializeToString(), external_data_dir=self.model_dir, arena=False)

    def _feeds(self, session, batch: np.ndarray, extra: dict[str, np.ndarray]) -> dict:
        wanted = {i.name for i in session.get_inputs()}
        feed = feeds_for(_GraphInputs(session, self.graph_inputs), batch, self.layers)
        feed.update(extra)
        return {k: v for k, v in feed.items() if k in wanted}

    def layer_model(self, model: onnx.ModelProto, i: int, outputs: list[str]) -> onnx.ModelProto:
        """Layer ``i`` of ``model`` (a graph with the same stream and side tensors) computing ``outputs``."""
        types = {**self.types, **{o: onnx.TensorProto.FLOAT for o in outputs}}
        types.update({name: _elem(v) for name, v in self.side[0].items()})
        return subgraph(model, outputs, stop=(self.cut.inputs[i], *self.cut.side), types=types, name=f"layer{i}")

    def layer_initializers(self, model: onnx.ModelProto, i: int, extra_outputs: Iterable[str] = ()) -> set[str]:
        """Initializers read by layer ``i``'s nodes (those on the way to its output stream and ``extra_outputs``,
        e.g. its present K/V)."""
        nodes, _ = _ancestors(model, [self.cut.outputs[i], *extra_outputs], stop={self.cut.inputs[i], *self.cut.side})
        return {t for n in nodes for t in n.input}

    def run(self, model: onnx.ModelProto, outputs: list[str], model_dir: Path | None = None,
            into: dict[str, np.ndarray] | None = None):
        """Yield ``(batch, {output: value})`` for layer ``self.layer`` of ``model`` over every batch; outputs
        named in ``into`` are written into those arrays, overwritten by each batch (``runtime.run_into``)."""
        return self.run_layer_model(self.layer_model(model, self.layer, outputs), outputs, model_dir, into)

    def run_layer_model(self, layer_model: onnx.ModelProto, outputs: list[str], model_dir: Path | None = None,
                        into: dict[str, np.ndarray] | None = None):
        """As ``run``, for a layer model made by ``layer_model`` (maybe edited since)."""
        session = make_session(layer_model.SerializeToString(), arena=False,
                               external_data_dir=model_dir if model_dir is not None else self.model_dir)
        stream_in = self.cut.inputs[self.layer]
        for b, batch in enumerate(self.batches):
            feed = self._feeds(session, batch, {stream_in: self.stream[b], **self.side[b]})
            yield batch, dict(zip(outputs, run_into(session, outputs, feed, into or {})))

    def advance(self, stream: list[np.ndarray]) -> None:
        """Hand layer ``self.layer``'s output stream (one array per batch) to the next layer."""
        self.stream = stream
        self.layer += 1


def _elem(value: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(value.dtype)
