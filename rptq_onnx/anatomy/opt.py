"""OPT's decoder layer (pre-LN): LayerNormalization nodes and the ReLU MLP.

    x ─ LayerNorm(attn) ─┬─ q_proj ─ (·scale) ─ Reshape ─ Transpose ─┐
                         ├─ k_proj ─ Reshape ─ Transpose ─ [Concat past] ─ Transpose ─ MatMul(QKᵀ) ─ … ─ Softmax
                         └─ v_proj ─ Reshape ─ Transpose ─ [Concat past] ─────────────── MatMul(PV) ─┘
      PV ─ Transpose ─ Reshape ─ out_proj ─ Add(residual) ─ [Reshape] ─ LayerNorm(final)
         ─ fc1 ─ ReLU ─ fc2
"""

from __future__ import annotations

import onnx

from rptq_onnx.anatomy.records import Linear, Norm, Rope
from rptq_onnx.anatomy.walk import QDQ_OPS, LayerWalker

FAMILY = "opt"
# fc1 → [ops that keep channels apart] → fc2
ACTIVATIONS = {"Relu", "Gelu", "FastGelu", "Tanh", "Sigmoid", "Erf", "Mul", "Div", "Add", "Cast", "Identity"}
ACTIVATION_PATH = ACTIVATIONS | QDQ_OPS


def rotary(w: LayerWalker, qk: onnx.NodeProto, q: Linear, k: Linear) -> tuple[Rope | None, Rope | None, str, str]:
    """(q RoPE, k RoPE, query, key): OPT has no RoPE, so R2 is the q_proj / k_proj outputs."""
    return None, None, q.output, k.output


def layer_norm(w: LayerWalker, node: onnx.NodeProto, role: str) -> Norm:
    """A LayerNormalization node (of the last axis) as a Norm; ``role`` names it in errors."""
    weight = w.g.constant_source(w.node_input(node, 1))
    bias = w.g.constant_source(w.node_input(node, 2)) if w.node_input(node, 2) else None
    if weight not in w.g.initializers:
        raise w.fail(f"{role} LayerNorm γ is not an initializer")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", -1) != -1:  # noqa: SIM102
        rank = len(w.shapes.get(node.input[0]) or [])
        if attrs.get("axis") != rank - 1:
            raise w.fail(f"{role} LayerNorm does not normalize the last axis")
    source, gather = node.input[0], None
    producer = w.g.producer.get(source)
    if producer is not None and producer.op_type == "Gather" and w.g.is_constant(producer.input[1]):
        source, gather = producer.input[0], producer.name
    return Norm(node=node.name, input=source, output=node.output[0], weight=weight, bias=bias,
                channels=int(w.g.initializers[weight].dims[0]), gather=gather)


def relu_mlp(w: LayerWalker, readers: set[str]) -> tuple[Linear, None, onnx.NodeProto, Linear]:
    """OPT: final LN → fc1 → activation → fc2."""
    fc1_node = w.g.node_by_name.get(next(iter(readers))) if len(readers) == 1 else None
    if fc1_node is None or not w.is_linear(fc1_node):
        raise w.fail("the final LayerNorm output does not feed exactly one linear (fc1)")
    fc1 = w.linear(fc1_node, "fc1")
    act_users = w.g.value_readers(fc1.output)
    if len(act_users) != 1 or act_users[0].op_type not in ACTIVATIONS:
        raise w.fail("no activation (ReLU) after fc1")
    act = act_users[0]
    hit = w.forward_to(act.output[0], w.is_linear, through=ACTIVATION_PATH, max_depth=6)
    if hit is None or hit[1] != 0:
        raise w.fail("no fc2 linear after the fc1 activation")
    fc2 = w.linear(hit[0], "fc2")
    if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
        raise w.fail("fc1/fc2 shapes do not form an MLP")
    return fc1, None, act, fc2


def ffn_norm(w: LayerWalker, residual: str) -> Norm:
    """R4: the final LayerNorm after the attention residual (through the reshape to 2-D)."""
    hit = w.forward_to(residual, lambda n: n.op_type == "LayerNormalization",
                       through={"Reshape", "Identity", "Flatten", "Cast", "Gather"}, max_depth=3)
    if hit is None:
        raise w.fail("no final LayerNorm after the attention residual (post-LN OPT such as opt-350m is not supported)")
    return layer_norm(w, hit[0], "final")


mlp = relu_mlp
