"""passes/fuse_norms.py: decomposed RMSNorms as one (Skip)SimplifiedLayerNormalization each, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from rptq_onnx.export import to_onnx
from rptq_onnx.models import random_llama, random_opt
from rptq_onnx.passes.fuse_norms import FuseNorms
from rptq_onnx.runtime import make_session


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = make_session(model.SerializeToString())
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if any(i.name == "position_ids" for i in sess.get_inputs()):
        feeds["position_ids"] = np.arange(ids.shape[1])[None].repeat(len(ids), 0)
    return sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]


def test_every_rms_norm_of_a_llama_becomes_one_node_with_the_same_logits():
    graph = to_onnx(random_llama(seed=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128), with_past=False)
    result = FuseNorms().run(graph)
    ops = [n.op_type for n in result.model.graph.node]
    layers = sum(n.op_type == "Softmax" for n in graph.graph.node)
    assert result.report.fused == 2 * layers + 1 and result.report.skipped == 0
    # every norm but the first reads a residual sum: the Add goes into the fused node, which returns the sum
    assert result.report.with_residual == 2 * layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers and ops.count("SimplifiedLayerNormalization") == 1
    assert "Pow" not in ops and "Sqrt" not in ops
    ids = np.random.default_rng(0).integers(0, 300, (2, 12))
    want, got = _run(graph, ids), _run(result.model, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert [n.op_type for n in graph.graph.node].count("Pow") == 2 * layers + 1, "the input model is left as it was"


def test_a_norm_whose_inner_tensor_is_read_elsewhere_is_left_and_counted():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("gamma", TensorProto.FLOAT, [8], list(np.linspace(0.5, 1.5, 8)))]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["ms_eps"]), helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["normed"]),
             helper.make_node("Mul", ["gamma", "normed"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    model = helper.make_model(helper.make_graph(nodes, "norm", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    fused = FuseNorms().run(model)
    assert fused.report.fused == 1 and [n.op_type for n in fused.model.graph.node] == ["SimplifiedLayerNormalization"]
    value = np.random.default_rng(2).normal(size=(1, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(make_session(fused.model.SerializeToString()).run(None, {"x": value})[0],
                               make_session(model.SerializeToString()).run(None, {"x": value})[0], rtol=1e-5, atol=1e-6)
    model.graph.output.append(helper.make_tensor_value_info("rms", TensorProto.FLOAT, None))  # read elsewhere
    left = FuseNorms().run(model)
    assert left.report.fused == 0 and left.report.skipped == 1 and not left.modified


def test_an_opt_graph_has_no_rms_norm_to_fuse():
    graph = to_onnx(random_opt(seed=1, hidden_size=32, num_attention_heads=2, ffn_dim=64), with_past=False)
    result = FuseNorms().run(graph)
    assert result.report.fused == 0 and not result.modified
