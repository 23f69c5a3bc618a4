"""Low-bit weights: DequantizeLinear and MatMulNBits forms compute x·dequant(W); GPTQ beats RTN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rptq_onnx.anatomy import Linear, find_layers
from rptq_onnx.compile import compile_graph
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.errors import RptqError
from rptq_onnx.export import to_onnx
from rptq_onnx.models import random_opt
from rptq_onnx.passes.quantize_weights import quantize_weights
from rptq_onnx.quant import dequantize_matmulnbits, pack_uint4, quantize_gptq, quantize_rtn, quantize_symmetric
from rptq_onnx.runtime import feeds_for, make_session

IN, OUT = 256, 96


def _linear_graph(layout: str):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(OUT, IN)).astype(np.float32) / 16  # [out, in]
    b = rng.normal(size=OUT).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, IN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, OUT])
    if layout == "in_out":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="lin"), helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
        inits = [numpy_helper.from_array(w.T.copy(), "w"), numpy_helper.from_array(b, "b")]
        lin = Linear("lin", "MatMul", "x", "y", "w", "in_out", "b", "bias", IN, OUT)
    else:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="lin", transB=1)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        lin = Linear("lin", "Gemm", "x", "y", "w", "out_in", "b", None, IN, OUT)
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), lin, w, b


def _run(model, x):
    return make_session(model.SerializeToString(), optimization="all").run(None, {"x": x})[0]


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("bits,group", [(4, None), (4, 64), (3, None), (8, None), (8, 128)])
def test_dq_form_equals_dequantized_matmul(layout, bits, group):
    model, lin, w, b = _linear_graph(layout)
    qw = quantize_rtn(w, bits, group)
    out, report = quantize_weights(model, {"lin": (lin, qw)}, form="dq")
    assert report == {"dq": 1, "matmulnbits": 0, "kept_source_grid": 0}
    onnx.checker.check_model(out, full_check=True)
    assert "w" not in {t.name for t in out.graph.initializer}  # the float weight is gone
    codes = next(t for t in out.graph.initializer if t.name.endswith(".codes"))
    assert codes.data_type == (TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8)
    x = np.random.default_rng(1).normal(size=(3, IN)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), x @ qw.dequantize().T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (4, 128), (4, None), (3, None), (8, None), (8, 64)])
def test_matmulnbits_equals_dq_matmul(layout, bits, block):
    """Grouped and per-channel codes, 3/4/8 bits: MatMulNBits computes the same as DequantizeLinear+MatMul,
    and its packed blocks dequantize (reference.py's reader) to exactly the codes' weight."""
    model, lin, w, _ = _linear_graph(layout)
    qw = quantize_rtn(w, bits, block)
    nbits, report = quantize_weights(model, {"lin": (lin, qw)}, form="matmulnbits")
    assert report == {"dq": 0, "matmulnbits": 1, "kept_source_grid": 0}
    node = next(n for n in nbits.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == (8 if bits == 8 else 4)
    inits = {t.name: numpy_helper.to_array(t) for t in nbits.graph.initializer}
    zp = inits[node.input[3]] if len(node.input) > 3 else None  # none when every zp is the kernel's default
    w_nbits = dequantize_matmulnbits(inits[node.input[1]], inits[node.input[2]], zp, attrs["K"], attrs["N"],
                                     attrs["bits"], attrs["block_size"])
    np.testing.assert_array_equal(w_nbits, qw.dequantize())
    dq, _ = quantize_weights(model, {"lin": (lin, qw)}, form="dq")
    x = np.random.default_rng(2).normal(size=(3, IN)).astype(np.float32)
    a, ref = _run(nbits, x), _run(dq, x)
    # 8 bits: accuracy level 4 quantizes the input to int8 per block (the fast integer kernel)
    assert attrs.get("accuracy_level", 0) == (4 if bits == 8 else 0)
    assert np.abs(a - ref).max() <= (1e-2 if bits == 8 else 1e-4) * np.abs(ref).max()


def test_pack_uint4_low_nibble_first():
    np.testing.assert_array_equal(pack_uint4(np.array([1, 2, 15, 0, 7])), [0x21, 0x0F, 0x07])


def test_symmetric_blocks_clip_nothing_unless_a_shrink_lowers_the_error():
    """``quantize_symmetric``: every zero point the kernel's default; without shrinks no block clips (its extremes
    are within half a step of their codes); the searched steps give less squared error, none a larger step."""
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(64, 128)) / 10  # heavy tails: clipping the largest value pays in most blocks
    plain, searched = quantize_symmetric(w, 4, 32), quantize_symmetric(w, 4, 32, (1.0, 0.9, 0.8, 0.7))
    assert (plain.zero_point == 8).all() and (searched.zero_point == 8).all()
    assert np.abs(plain.dequantize() - w).max() <= plain.scale.max() / 2 + 1e-7
    err = lambda q: ((q.dequantize() - w) ** 2).reshape(64, 4, 32).sum(-1)  # noqa: E731
    assert (err(searched) <= err(plain) + 1e-12).all() and err(searched).sum() < 0.99 * err(plain).sum()
    assert (searched.scale <= plain.scale + 1e-9).all() and (searched.scale < plain.scale).any()


def test_gptq_reduces_output_error_against_rtn_on_correlated_inputs():
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(64, 64))
    x = rng.normal(size=(2048, 64)) @ mix  # correlated features, as real activations
    w = rng.normal(size=(32, 64))
    h = 2 * x.T @ x / len(x)
    x_test = rng.normal(size=(512, 64)) @ mix
    for bits in (4, 3):
        err_rtn = np.mean((x_test @ (quantize_rtn(w, bits).dequantize() - w).T) ** 2)
        err_gptq = np.mean((x_test @ (quantize_gptq(w, h, bits).dequantize() - w).T) ** 2)
        assert err_gptq < 0.8 * err_rtn


def test_gptq_on_a_scratch_hessian_equals_gptq_on_a_copy_and_a_spent_hessian_leaves_the_calibration():
    from rptq_onnx.calibrate import Calibration

    rng = np.random.default_rng(4)
    x = (rng.normal(size=(512, 48)) @ rng.normal(size=(48, 48))).astype(np.float32)
    w = rng.normal(size=(16, 48)).astype(np.float32)
    calib = Calibration(stats={}, tokens=len(x), xtx={(0, "fc2_in"): x.T @ x})
    fresh = calib.hessian(0, "fc2_in")
    copied = quantize_gptq(w, fresh, 4, 16)
    np.testing.assert_array_equal(fresh, calib.hessian(0, "fc2_in"))  # the copy path leaves H as it was
    spent = calib.hessian(0, "fc2_in", spend=True)
    assert not calib.xtx
    np.testing.assert_array_equal(spent, fresh)
    scratch = quantize_gptq(w, spent, 4, 16, overwrite_hessian=True)
    assert not np.array_equal(spent, fresh)  # used as scratch, in place
    np.testing.assert_array_equal(scratch.codes, copied.codes)
    np.testing.assert_array_equal(scratch.scale, copied.scale)


def _logits(model, ids, layers):
    sess = make_session(model.SerializeToString())
    return sess.run(None, feeds_for(sess, ids, layers))[0]


@pytest.mark.slow
def test_gptq_beats_rtn_on_a_model_at_w4a16_and_w3a16():
    hf = random_opt(seed=5, num_hidden_layers=2, hidden_size=128, num_attention_heads=4, ffn_dim=512, vocab_size=300)
    graph = to_onnx(hf, with_past=False)
    layers = find_layers(graph)
    rng = np.random.default_rng(0)
    calib, held_out = rng.integers(0, 300, (16, 64)), rng.integers(0, 300, (4, 64))
    ref = _logits(graph, held_out, layers)
    for wbits in (4, 3):
        mse = {}
        for algo in ("rtn", "gptq"):
            cfg = CompileConfig(quant=QuantSpec(wbits=wbits, abits=16, weight_quant=algo, group_size=None),
                                calib=CalibConfig(nsamples=16, seqlen=64), clusters=ClusterCounts(R1=4, R4=4, R5=4))
            model = compile_graph(graph, layers, calib, cfg).model
            mse[algo] = float(np.mean((_logits(model, held_out, layers) - ref) ** 2))
        assert mse["gptq"] < mse["rtn"], (wbits, mse)


@pytest.mark.slow
def test_w4_weight_bytes_are_under_a_third_of_fp16():
    hf = random_opt(seed=6, num_hidden_layers=1, hidden_size=128, num_attention_heads=4, ffn_dim=512, vocab_size=300)
    graph = to_onnx(hf, with_past=False)
    layers = find_layers(graph)
    params = sum(getattr(layers[0], r).in_features * getattr(layers[0], r).out_features
                 for r in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
    for group in (None, 128):
        cfg = CompileConfig(quant=QuantSpec(wbits=4, abits=16, weight_quant="rtn", group_size=group),
                            calib=CalibConfig(nsamples=2, seqlen=16))
        model = compile_graph(graph, layers, np.zeros((2, 16), np.int64), cfg).model
        low = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer if t.name.startswith("rptq.w."))
        assert low <= 0.3 * 2 * params, (group, low, 2 * params)


def test_group_size_falls_back_to_a_divisor():
    from rptq_onnx.quantize import effective_group

    assert effective_group(1536, 128) == 128
    assert effective_group(576, 128) == 64  # SmolLM2's hidden size: MatMulNBits blocks of 64, not per channel
    assert effective_group(48, 128) == 16 and effective_group(40, 128) is None and effective_group(576, None) is None
    with pytest.raises(RptqError, match="--group-size 8: use a power of two ≥ 16"):
        QuantSpec(wbits=4, abits=16, group_size=8)  # smaller than any block MatMulNBits takes


def test_accuracy_level_4_is_set_on_4_bit_kernels_when_asked():
    model, lin, w, _ = _linear_graph("in_out")
    for level in (0, 4):
        out, _ = quantize_weights(model, {"lin": (lin, quantize_rtn(w, 4, 32))}, form="matmulnbits", accuracy_level=level)
        node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("accuracy_level", 0) == level


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_matmulnbits_bench_times_every_zero_point_form(capsys, dtype):
    from rptq_onnx.tools.bench_matmulnbits import VARIANTS, main

    assert main(["--k", "64", "--layers", "2", "--runs", "3", "--rounds", "1", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert f"({dtype})" in out and "CPU provider" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(VARIANTS)
    assert all(float(cell) > 0 for r in rows for cell in r.strip("| ").split(" | ")[1:])


def test_matmulnbits_bench_refuses_cuda_without_a_gpu():
    from rptq_onnx.runtime import _cuda_device_present
    from rptq_onnx.tools.bench_matmulnbits import main

    if _cuda_device_present():
        pytest.skip("a CUDA device is present: the CUDA provider may load here")
    with pytest.raises(SystemExit, match="CUDAExecutionProvider is not available.*--provider cpu"):
        main(["--k", "64", "--layers", "1", "--runs", "1", "--rounds", "1", "--provider", "cuda"])
