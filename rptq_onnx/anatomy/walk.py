"""Walking a decoder layer's data path: the graph helpers OPT and Llama matching share."""

from __future__ import annotations

import onnx

from rptq_onnx.anatomy.records import Linear
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex, extended_input
from rptq_onnx.vocabulary import BLOCK_SUMS_PREFIX, LAYOUT_PREFIX, OFFSET_ADD_SUFFIX, WEIGHT_PREFIX, WITH_BLOCK_SUMS_PREFIX

# Ops that carry a tensor's values to another layout without mixing channels of different
# tokens; the walks below pass through them. Input 0 is the data input unless listed below.
# Compiled graphs add QuantizeLinear → [Clip] → DequantizeLinear on the data path.
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Clip"}
DATA_PATH_OPS = {"Reshape", "Transpose", "Cast", "Identity", "Expand", "Unsqueeze", "Squeeze",
                 "Mul", "Div", "Add", "Sub", "Concat", "Dropout", "Flatten", "Slice"} | QDQ_OPS
ELEMENTWISE_MULTI = {"Mul", "Div", "Add", "Sub", "Concat"}


def first_token_role(node: onnx.NodeProto) -> str | None:
    """For the nodes that keep a point's first token in float (passes/emit_qdq.py, ``rptq.layout.<tag>.first.*``):
    the part (``out`` is the Add whose output the point's readers read), else None."""
    head, sep, role = node.name.rpartition(".first.")
    return role if sep and head.startswith(LAYOUT_PREFIX) else None


class LayerWalker:
    """Walks one decoder layer from its attention Softmax; every failure names the layer and the part missing."""

    def __init__(self, index: GraphIndex, shapes: dict[str, list], layer: int):
        self.g = index
        self.shapes = shapes
        self.layer = layer

    def fail(self, what: str) -> RptqError:
        return RptqError(f"layer {self.layer}: {what}; rptq-onnx supports pre-LN OPT and Llama decoder graphs from "
                         "`rptq-onnx export`")

    def node_input(self, node: onnx.NodeProto, i: int) -> str:
        return node.input[i] if len(node.input) > i else ""

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        if node.op_type in ELEMENTWISE_MULTI:
            return self.g.dynamic_inputs(node)
        return [node.input[0]] if node.input and node.input[0] else []

    def back_to(self, tensor: str, predicate, max_depth: int = 10) -> tuple[onnx.NodeProto, str] | None:
        """Walk producers along data inputs until ``predicate(node)``; return (node, tensor)."""
        def step(name):
            node = self.g.producer.get(name)
            if node is None:
                return None, []
            if predicate(node):
                return (node, name), []
            walk_on = node.op_type in DATA_PATH_OPS or node.op_type in ("Where", "Max", "Min")
            return None, self.data_inputs(node) if walk_on else []
        return _breadth_first(tensor, step, max_depth)

    def forward_to(self, tensor: str, predicate, through: set[str], max_depth: int = 10) -> tuple[onnx.NodeProto, int] | None:
        """Walk consumers through ``through`` ops until ``predicate(node)``; return (node, input index)."""
        def step(name):
            ahead = []
            for node in self.g.consumers.get(name, []):
                if predicate(node):
                    return (node, list(node.input).index(name)), []
                if node.op_type in through or first_token_role(node) is not None or \
                        node.name.startswith(WITH_BLOCK_SUMS_PREFIX):  # [x, block means of x …]: to the linear
                    ahead += [o for o in node.output if o]
            return None, ahead
        return _breadth_first(tensor, step, max_depth)

    def is_dynamic_matmul(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "MatMul" and len(self.g.dynamic_inputs(node)) == 2

    def weight_source(self, tensor: str) -> tuple[str | None, str | None]:
        """(initializer, DequantizeLinear node) behind a weight input, or (None, None)."""
        src = self.g.constant_source(tensor)
        if src is not None:
            return src, None
        producer = self.g.producer.get(tensor)
        if producer is not None and producer.op_type == "DequantizeLinear" and self.g.is_constant(producer.input[0]):
            return self.g.constant_source(producer.input[0]), producer.name
        return None, None

    def is_linear(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "MatMulNBits":
            return True
        if node.name.startswith(WEIGHT_PREFIX):  # a kept source grid's block sums / offset term, not a layer
            return False
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            src, _ = self.weight_source(node.input[1])
            shape = self.g.constant_shape(src) if src else None
            return shape is not None and len(shape) == 2 and not self.g.is_constant(node.input[0])
        return False

    def linear(self, node: onnx.NodeProto, role: str) -> Linear:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out_t, bias, bias_node = self._bias_output(node)
            x, k = node.input[0], int(attrs["K"])
            extended = extended_input(self.g, x, k)
            if extended is not None:  # [x, block means of x …]: the linear's input is x
                x, k, _ = extended
            return Linear(node=node.name, op=node.op_type, input=x, output=out_t, weight=node.input[1],
                          weight_layout="nbits", bias=bias, bias_node=bias_node, in_features=k,
                          out_features=int(attrs["N"]))
        weight, dq = self.weight_source(node.input[1])
        if weight not in self.g.initializers:
            raise self.fail(f"{role} weight is not an initializer")
        dims = tuple(self.g.initializers[weight].dims)
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                raise self.fail(f"{role} is a Gemm with transA=1")
            layout = "out_in" if attrs.get("transB", 0) else "in_out"
            bias = self.g.constant_source(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            out_t, bias_node = node.output[0], None
        else:
            layout = "in_out"
            out_t, bias, bias_node = self._bias_output(node)
        in_f, out_f = (dims[1], dims[0]) if layout == "out_in" else (dims[0], dims[1])
        return Linear(node=node.name, op=node.op_type, input=node.input[0], output=out_t, weight=weight,
                      weight_layout=layout, bias=bias, bias_node=bias_node, in_features=int(in_f), out_features=int(out_f),
                      weight_dq=dq)

    def _bias_output(self, node: onnx.NodeProto) -> tuple[str, str | None, str | None]:
        """(output after the bias, bias initializer, bias Add node) of a MatMul-like node (after the
        offset term of codes kept from a source grid, passes/quantize_weights.py, where there is one)."""
        out = node.output[0]
        users = self.g.value_readers(out)
        if len(users) == 1 and users[0].op_type == "Add" and users[0].name.endswith(OFFSET_ADD_SUFFIX):
            out = users[0].output[0]
            users = self.g.value_readers(out)
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = [t for t in add.input if t != out]
            src = self.g.constant_source(other[0]) if other else None
            if src is not None and len(self.g.constant_shape(src) or ()) == 1:
                return add.output[0], src, add.name
        return out, None, None

    def before_qdq(self, tensor: str) -> str:
        """The float tensor a Q → [Clip] → DQ chain (if any) fake-quantizes."""
        for _ in range(5):
            producer = self.g.producer.get(tensor)
            if producer is not None and first_token_role(producer) == "out":  # dq + m·(x − dq): back to x
                tensor = self.g.node_by_name[producer.name[:-len("out")] + "error"].input[0]
                continue
            if producer is None or producer.op_type not in QDQ_OPS or self.g.is_constant(producer.input[0]):
                break
            tensor = producer.input[0]
        return tensor

    def readers_through_qdq(self, tensor: str) -> set[str]:
        """Names of the nodes reading ``tensor``, looking through a Q/DQ chain (block sums or means made for the
        linears reading it, passes/quantize_weights.py, are part of those linears)."""
        names = set()
        for node in self.g.value_readers(tensor):
            if node.name.startswith(WITH_BLOCK_SUMS_PREFIX):  # [x, block means …]: read by the linears of x
                names |= self.readers_through_qdq(node.output[0])
                continue
            if node.name.startswith(BLOCK_SUMS_PREFIX):
                continue
            role = first_token_role(node)
            if role == "out":
                names |= self.readers_through_qdq(node.output[0])
            elif role is not None:
                continue
            elif node.op_type in QDQ_OPS:
                names |= self.readers_through_qdq(node.output[0])
            else:
                names.add(node.name)
        return names

    def linear_behind(self, tensor: str, role: str) -> Linear:
        # deep enough for Llama's k in a compiled graph: GQA repeat, cache Concat, head-layout Q/DQ, RoPE
        found = self.back_to(tensor, self.is_linear, max_depth=24)
        if found is None:
            raise self.fail(f"no {role} linear (MatMul/Gemm with a weight initializer) feeds the attention")
        return self.linear(found[0], role)

    def skip_casts(self, tensor: str) -> str:
        """``tensor`` with Cast / Identity producers looked through (TorchScript casts norm inputs)."""
        for _ in range(4):
            producer = self.g.producer.get(tensor)
            if producer is None or producer.op_type not in ("Cast", "Identity"):
                break
            tensor = producer.input[0]
        return tensor


def _breadth_first(start: str, step, max_depth: int):
    """Visit tensors breadth first from ``start``: ``step(tensor)`` gives (a hit or None, next tensors)."""
    frontier, seen = [(start, 0)], set()
    while frontier:
        name, depth = frontier.pop(0)
        if name in seen or depth > max_depth:
            continue
        seen.add(name)
        hit, ahead = step(name)
        if hit is not None:
            return hit
        frontier.extend((t, depth + 1) for t in ahead)
    return None
