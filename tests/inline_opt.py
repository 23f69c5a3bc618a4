"""A pre-LN OPT decoder written node by node with ``onnx.helper`` (no torch, no export): the graph the
fast pass tests run on. Same structure as `rptq-onnx export` writes (eager attention, q scaled after
q_proj, an additive mask from ``attention_mask`` before the softmax), tiny sizes, seeded weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def inline_opt(layers: int = 2, hidden: int = 16, heads: int = 2, ffn: int = 32, vocab: int = 40,
               with_past: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Inputs ``input_ids``, ``attention_mask`` [B, past + S] (and ``past_key_values.N.key/value``
    [B, heads, past, head_dim]); outputs ``logits`` (and ``present.N.key/value``)."""
    rng = np.random.default_rng(seed)
    d = hidden // heads
    nodes, inits = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name, *shape, scale=0.3):
        return init(name, (rng.normal(size=shape) * scale).astype(np.float32))

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(x, name, n_in, n_out):
        y = node("MatMul", [x, weight(f"{name}.weight", n_in, n_out)], f"{name}.matmul")
        return node("Add", [y, weight(f"{name}.bias", n_out, scale=0.1)], f"{name}.out")

    def layer_norm(x, name, channels):
        gamma = init(f"{name}.gamma", (1 + rng.normal(size=channels) * 0.2).astype(np.float32))
        return node("LayerNormalization", [x, gamma, weight(f"{name}.beta", channels, scale=0.1)], f"{name}.out",
                    axis=-1, epsilon=1e-5)

    init("heads_shape", np.array([0, 0, heads, d], np.int64))
    init("merged_shape", np.array([0, 0, hidden], np.int64))
    init("scaling", np.array(d ** -0.5, np.float32))
    init("one", np.array(1.0, np.float32))
    init("big_negative", np.array(-1e4, np.float32))
    init("mask_axes", np.array([1, 2], np.int64))
    # additive padding mask [B, 1, 1, past + S] (no causal part: the tests compare functions, not models)
    mask = node("Cast", ["attention_mask"], "mask.float", to=TensorProto.FLOAT)
    mask = node("Sub", ["one", mask], "mask.inverted")
    mask = node("Mul", [mask, "big_negative"], "mask.additive")
    mask = node("Unsqueeze", [mask, "mask_axes"], "mask.bias")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    h = node("Gather", [weight("embed", vocab, hidden), "input_ids"], "embed.out")
    for i in range(layers):
        p = f"L{i}"
        x = layer_norm(h, f"{p}.attn_ln", hidden)
        q = node("Mul", [linear(x, f"{p}.q_proj", hidden, hidden), "scaling"], f"{p}.q_scaled")
        k = linear(x, f"{p}.k_proj", hidden, hidden)
        v = linear(x, f"{p}.v_proj", hidden, hidden)
        qh = node("Transpose", [node("Reshape", [q, "heads_shape"], f"{p}.q_heads")], f"{p}.q_bhsd", perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, "heads_shape"], f"{p}.k_heads")], f"{p}.k_bhsd", perm=[0, 2, 1, 3])
        vh = node("Transpose", [node("Reshape", [v, "heads_shape"], f"{p}.v_heads")], f"{p}.v_bhsd", perm=[0, 2, 1, 3])
        if with_past:
            for kind, new in (("key", kh), ("value", vh)):
                past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
                inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", heads, "past", d]))
                outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["batch", heads, "total", d]))
                nodes.append(helper.make_node("Concat", [past, new], [present], name=f"{p}.{kind}.concat", axis=2))
            kh, vh = f"present.{i}.key", f"present.{i}.value"
        kt = node("Transpose", [kh], f"{p}.k_bhdt", perm=[0, 1, 3, 2])
        scores = node("Add", [node("MatMul", [qh, kt], f"{p}.qk"), mask], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.softmax", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, vh], f"{p}.pv")], f"{p}.ctx_bshd", perm=[0, 2, 1, 3])
        attn = node("Reshape", [ctx, "merged_shape"], f"{p}.attn_out")
        h = node("Add", [linear(attn, f"{p}.out_proj", hidden, hidden), h], f"{p}.attn_residual")
        y = node("Relu", [linear(layer_norm(h, f"{p}.final_ln", hidden), f"{p}.fc1", hidden, ffn)], f"{p}.relu")
        h = node("Add", [linear(y, f"{p}.fc2", ffn, hidden), h], f"{p}.mlp_residual")
    node("MatMul", [layer_norm(h, "final_ln", hidden), weight("lm_head", hidden, vocab)], "logits")
    graph = helper.make_graph(nodes, "inline-opt", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 5, past: int = 0, seed: int = 1) -> dict:
    """Random ids, an all-ones mask, and random float past K/V when the graph takes them."""
    rng = np.random.default_rng(seed)
    vocab = next(t.dims[0] for t in model.graph.initializer if t.name == "embed")
    feed = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, past + seq), np.int64)}
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            dims = value.type.tensor_type.shape.dim
            feed[value.name] = rng.normal(size=(batch, dims[1].dim_value, past, dims[3].dim_value)).astype(np.float32)
    return feed
