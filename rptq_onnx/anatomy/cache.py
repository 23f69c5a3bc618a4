"""The K/V cache of a decoder layer: the present outputs and past inputs around its cache Concats (float or low-bit)."""

from __future__ import annotations

from rptq_onnx.graph import GraphIndex


def graph_output_on_path(index: GraphIndex, start: str, end: str) -> str | None:
    """A graph output (present K/V) produced between ``start`` and ``end`` on the data path."""
    outputs = set(index.graph_outputs)
    name, steps = end, 0
    while name and steps < 8:
        if name in outputs:
            return name
        node = index.producer.get(name)
        if node is None or name == start:
            return None
        if node.op_type == "Concat":
            if any(t in outputs for t in node.output):
                return node.output[0]
            stored = _stored_as_output(index, node.output[0])
            if stored:
                return stored
        name = node.input[0] if node.op_type != "Concat" else next(
            (t for t in node.input if t not in index.graph_inputs), "")
        steps += 1
    return None


# how a low-bit cache is stored (passes/quantize_kv_cache.py): Transpose → Reshape → QuantizeLinear
_STORE_OPS = ("Transpose", "Reshape", "QuantizeLinear")
_LOAD_OPS = ("DequantizeLinear", "Reshape", "Transpose")


def _stored_as_output(index: GraphIndex, tensor: str) -> str | None:
    """The graph output that ``tensor`` (a float cache) is stored to through the low-bit store chain."""
    frontier = [tensor]
    for op in _STORE_OPS:
        frontier = [n.output[0] for t in frontier for n in index.consumers.get(t, []) if n.op_type == op and n.input[0] == t]
    found = [t for t in frontier if t in index.graph_outputs]
    return found[0] if len(found) == 1 else None


def past_input(index: GraphIndex, present: str | None) -> str | None:
    if present is None:
        return None
    node = index.producer.get(present)
    for _ in range(len(_STORE_OPS)):  # a low-bit cache: back to its float Concat
        if node is None or node.op_type == "Concat":
            break
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return None
    for tensor in node.input:
        for _ in range(5):  # TorchScript routes the past through a one-input Concat; a low-bit past is loaded
            if tensor in index.graph_inputs:
                return tensor
            producer = index.producer.get(tensor)
            if producer is None:
                break
            if producer.op_type in ("Concat", "Identity", "Cast") and len(producer.input) == 1:
                tensor = producer.input[0]
            elif producer.op_type in _LOAD_OPS:
                tensor = producer.input[0]
            else:
                break
    return None
