"""emit_qdq pass on a tiny inline graph: the exact nodes it adds, and ORT = NumPy fake quant."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rptq_onnx.passes.emit_qdq import QuantPoint, emit_qdq
from rptq_onnx.quant import QParams, activation_qparams, fake_quant
from rptq_onnx.runtime import make_session


def _graph(channels=12):
    # x → Relu → y → (Neg → out1, Abs → out2): y has two readers, both must move to the DQ output
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Neg", ["y"], ["o1"], name="neg"),
             helper.make_node("Abs", ["y"], ["o2"], name="abs")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, channels])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, channels]) for n in ("o1", "o2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("bits,container,clip", [(8, TensorProto.UINT8, False), (4, TensorProto.UINT4, False),
                                                 (3, TensorProto.UINT8, True), (6, TensorProto.UINT8, True)])
def test_qdq_nodes_and_exact_values(bits, container, clip):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(2, 5, 12)) * np.linspace(0.1, 5, 12)).astype(np.float32)
    y = np.maximum(x, 0)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3])  # clusters need not be contiguous
    qp = activation_qparams(y.max((0, 1)), y.min((0, 1)), labels, bits)
    model, report = emit_qdq(_graph(), [QuantPoint("L0.t", "y", qp)])
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == Counter({"Relu": 1, "Neg": 1, "Abs": 1, "QuantizeLinear": 1, "DequantizeLinear": 1,
                           **({"Clip": 1} if clip else {})})
    zp = next(t for t in model.graph.initializer if t.name.endswith("zero_point"))
    assert zp.data_type == container
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert helper.get_attribute_value(q.attribute[0]) == -1  # axis=-1, one value per channel
    assert {n.input[0] for n in model.graph.node if n.op_type in ("Neg", "Abs")} == {"rptq.qdq.L0.t.dq"}
    onnx.checker.check_model(model, full_check=True)
    assert report == {"points": 1, "by_bits": {str(bits): 1}}
    sess = make_session(model.SerializeToString(), optimization="all")
    o1, _ = sess.run(None, {"x": x})
    _, ref = fake_quant(y, qp)
    np.testing.assert_array_equal(-o1, ref)


def test_activation_qparams_per_cluster_by_hand():
    mx = np.array([1.0, 4.0, 2.0, 8.0])
    mn = np.array([-1.0, 0.5, -2.0, 1.0])  # cluster 1 = channels 1, 3: range [0.5, 8] excludes 0
    qp = activation_qparams(mx, mn, np.array([0, 1, 0, 1]), bits=4)
    # cluster 0: [-2, 2] → scale 4/16, zp round(0) + 8 = 8; cluster 1 widened to [0, 8] → scale 0.5, zp round(-8) + 8 = 0
    np.testing.assert_allclose(qp.scale, [0.25, 0.5, 0.25, 0.5])
    np.testing.assert_array_equal(qp.zero_point, [8, 0, 8, 0])
    codes, deq = fake_quant(np.array([[2.0, 8.0, -2.0, 0.0]]), qp)
    np.testing.assert_array_equal(codes, [[15, 15, 0, 0]])  # the top value clips by one step, as the reference
    np.testing.assert_allclose(deq, [[1.75, 7.5, -2.0, 0.0]])


def test_per_tensor_point_uses_a_scalar():
    qp = activation_qparams(np.array([1.0]), np.array([0.0]), np.array([0]), 8)
    model, _ = emit_qdq(_graph(1), [QuantPoint("L0.P", "y", qp, per_tensor=True)])
    scale = next(t for t in model.graph.initializer if t.name.endswith("scale"))
    assert list(scale.dims) == []


def test_row_max_point_quantizes_each_row_relative_to_its_maximum():
    # softmax-like rows: one row spread thin (max 0.05), one with a sink (max 0.9)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 64)).astype(np.float32)
    logits[1, :, 0] += 8.0
    y = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    qp = QParams(scale=np.array([1 / 255], np.float32), zero_point=np.array([0]), bits=8)  # as quantize.py sets P
    point = QuantPoint("L0.P", "y", qp, per_tensor=True, row_max=True)
    model, _ = emit_qdq(_graph(64), [point])
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ReduceMax"] == 1 and ops["Div"] == 1 and ops["Mul"] == 1
    ident = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id"),
                               *[n for n in model.graph.node if n.name != "relu"]], "g", model.graph.input,
                              model.graph.output, list(model.graph.initializer))
    sess = make_session(helper.make_model(ident, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
                        .SerializeToString())
    o1, _ = sess.run(None, {"x": y})
    row_max = y.max(-1, keepdims=True)
    np.testing.assert_allclose(-o1, np.round(y / row_max * 255) / 255 * row_max, rtol=1e-6, atol=1e-9)
    fixed = np.round(y * 255) / 255
    assert np.abs(-o1 - y).sum() < 0.5 * np.abs(fixed - y).sum()  # finer than the fixed 1/255 grid

    from rptq_onnx.point_error import bypassed, qdq_points
    float_model = bypassed(helper.make_model(ident, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
                           qdq_points(model))
    o1, _ = make_session(float_model.SerializeToString()).run(None, {"x": y})
    np.testing.assert_allclose(-o1, y, rtol=1e-6)  # what is left without the Q/DQ is an identity


def _token_graph(flat: bool, mask_type=TensorProto.INT64):
    """input_ids [B, S], attention_mask [B, T] (T ≥ S: past tokens counted first) and x → Relu → y → Neg → out,
    y [B, S, C] or, with ``flat``, [B·S, C] (OPT's MLP)."""
    c = 6
    shape = [None, c] if flat else [None, None, c]
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Neg", ["y"], ["out"], name="neg")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None]),
                                       helper.make_tensor_value_info("attention_mask", mask_type, [None, None]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("mask,first", [
    ([[1, 1, 1, 1], [1, 1, 1, 1]], [[0], [0]]),            # no padding, no past: position 0 of each sequence
    ([[0, 0, 1, 1], [0, 1, 1, 1]], [[2], [1]]),            # left padding: each sequence's first real token
    ([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], [[], [1]]),  # two past tokens: the first may already be cached
])
def test_keep_first_passes_each_sequences_first_token_in_float(flat, mask, first):
    rng = np.random.default_rng(0)
    b, s, c = 2, 4, 6
    x = (rng.normal(size=(b, s, c)) * 3).astype(np.float32)
    y = np.maximum(x, 0)
    qp = activation_qparams(y.max((0, 1)), y.min((0, 1)), np.array([0, 0, 1, 1, 2, 2]), 4)
    model, _ = emit_qdq(_token_graph(flat), [QuantPoint("L0.fc2_in", "y", qp, keep_first=True)])
    onnx.checker.check_model(model, full_check=True)
    assert next(n for n in model.graph.node if n.name == "neg").input[0] == "rptq.layout.L0.fc2_in.first.out"
    feed = {"input_ids": np.zeros((b, s), np.int64), "attention_mask": np.array(mask, np.int64),
            "x": x.reshape(b * s, c) if flat else x}
    out = -make_session(model.SerializeToString()).run(None, feed)[0].reshape(b, s, c)
    _, quantized = fake_quant(y, qp)
    expected = quantized.copy()
    for i, rows in enumerate(first):
        expected[i, rows] = y[i, rows]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert any(first) == (not np.allclose(expected, quantized))  # the kept tokens are off the grid


def test_keep_first_shares_one_mask_across_calls_and_needs_the_token_inputs():
    qp = activation_qparams(np.ones(6), np.zeros(6), np.zeros(6, int), 4)
    model = _token_graph(False)
    model.graph.node[1].output[0] = "z"  # y → Neg → z → Abs → out
    model.graph.node.append(helper.make_node("Abs", ["z"], ["out"], name="abs"))
    model, _ = emit_qdq(model, [QuantPoint("L0.a", "y", qp, keep_first=True)])
    model, _ = emit_qdq(model, [QuantPoint("L1.a", "z", qp, keep_first=True)])  # as the layer-wise compile calls it
    assert sum("rptq.layout.first_token.mask" in n.output for n in model.graph.node) == 1
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(Exception, match="input_ids and attention_mask"):
        emit_qdq(_graph(6), [QuantPoint("L0.a", "y", qp, keep_first=True)])


def test_keep_first_takes_an_int32_attention_mask():
    qp = activation_qparams(np.full(6, 4.0), np.zeros(6), np.zeros(6, int), 4)
    model, _ = emit_qdq(_token_graph(False, TensorProto.INT32), [QuantPoint("L0.a", "y", qp, keep_first=True)])
    x = np.full((1, 3, 6), 0.1, np.float32)
    feed = {"input_ids": np.zeros((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int32), "x": x}
    out = -make_session(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(out[0, 0], 0.1, rtol=1e-6)  # kept
    np.testing.assert_array_equal(out[0, 1:], 0.0)  # 0.1 rounds to the grid's 0 (step 4/15)
