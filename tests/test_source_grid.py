"""Weights already on a low-bit grid (a dequantized GGUF Q4_1, a GPTQ checkpoint) keep their exact codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rptq_onnx.anatomy import Linear, find_layers
from rptq_onnx.compile import compile_graph
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.export import to_onnx
from rptq_onnx.models import random_llama, random_opt
from rptq_onnx.passes.quantize_weights import quantize_weights
from rptq_onnx.placement import classify
from rptq_onnx.runtime import feeds_for, make_session
from rptq_onnx.quant import dequantize_matmulnbits, offset_columns, unfold_offset
from rptq_onnx.source_grid import find_grid, fold_offset, weight_on_grid


def q4_1(w: np.ndarray, block: int = 32) -> np.ndarray:
    """``w`` [out, in] through llama.cpp's Q4_1 (blocks along the input, fp16 step and minimum), dequantized."""
    out, cols = w.shape
    b = w.reshape(out, cols // block, block).astype(np.float32)
    lo, hi = b.min(axis=2, keepdims=True), b.max(axis=2, keepdims=True)
    d = (hi - lo) / 15
    q = np.clip(np.floor((b - lo) / np.where(d > 0, d, 1) + 0.5), 0, 15)
    d16, m16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    return (d16 * q + m16).astype(np.float32).reshape(out, cols)


def test_q4_1_weights_are_found_exactly_and_float_weights_are_not():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 256)).astype(np.float32) / 10
    grid = q4_1(w)
    grid[3, :32] = grid[3, 0]  # a constant block
    grid[5, 32:64] = np.linspace(0, 13, 32).round() * 0.01 - 0.05  # a block using 14 of the 16 steps
    qw = weight_on_grid(grid, 4)
    assert qw is not None and qw.group_size == 32 and qw.offset is not None
    np.testing.assert_allclose(qw.dequantize(), grid, rtol=0, atol=1e-6)  # ≤ 1e-4 of a step: float rounding
    assert qw.codes.max() <= 15
    assert weight_on_grid(w, 4) is None  # float weights
    assert weight_on_grid(grid, 3) is None  # 16 levels do not fit 3 bits
    assert find_grid(grid, 4, 64) is None  # each block of 32 has its own step
    wide = weight_on_grid(grid, 8)  # the same codes, spread over the 8-bit grid
    np.testing.assert_allclose(wide.dequantize(), grid, rtol=0, atol=1e-6)


def _two_linears(layout: str, rng: np.random.Generator, k: int = 128, n: int = 40, rank: int = 2):
    """(model, weights, Q4_1 weights [out, in], bias): two linears reading one input x [3, k] (rank 3: [1, 3, k]),
    MatMul (``in_out``) or Gemm with a bias (``out_in``), each weight on a Q4_1 grid."""
    ws = [q4_1(rng.normal(size=(n, k)).astype(np.float32)) for _ in range(2)]
    b = rng.normal(size=n).astype(np.float32)
    nodes, inits, weights = [], [numpy_helper.from_array(b, "b")], {}
    for i, w in enumerate(ws):
        if layout == "in_out":
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"lin{i}"))
            inits.append(numpy_helper.from_array(w.T.copy(), f"w{i}"))
            lin = Linear(f"lin{i}", "MatMul", "x", f"y{i}", f"w{i}", "in_out", None, None, k, n)
        else:
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}", "b"], [f"y{i}"], name=f"lin{i}", transB=1))
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            lin = Linear(f"lin{i}", "Gemm", "x", f"y{i}", f"w{i}", "out_in", "b", None, k, n)
        weights[f"lin{i}"] = (lin, weight_on_grid(w, 4))
    lead = [1, 3] if rank == 3 else [3]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, lead + [k])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, lead + [n]) for i in range(2)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model, weights, ws, (b if layout == "out_in" else 0)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_offset_codes_run_as_matmulnbits_with_a_shared_block_sum(layout):
    """Two linears read one input: one block-sum MatMul feeds both offset terms; outputs are x·Wᵀ (+ b)."""
    rng = np.random.default_rng(1)
    model, weights, ws, bias = _two_linears(layout, rng)
    out, report = quantize_weights(model, weights, form="matmulnbits")
    onnx.checker.check_model(out, full_check=True)
    assert report["kept_source_grid"] == 2 and report["matmulnbits"] == 2
    assert sum(n.name.startswith("rptq.w.block_sums.") for n in out.graph.node) == 1
    # every zp of a kept grid is the kernel's default 8: no zero-point input (the integer kernel's symmetric path)
    assert all(len(n.input) == 3 for n in out.graph.node if n.op_type == "MatMulNBits")
    x = rng.normal(size=(3, 128)).astype(np.float32)
    got = make_session(out.SerializeToString()).run(None, {"x": x})
    for i, w in enumerate(ws):
        want = x @ w.T + bias
        np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="matmulnbits"):
        quantize_weights(model, weights, form="dq")


def test_folded_offsets_keep_the_codes_and_come_within_a_small_part_of_a_step():
    """``fold_offset``: the same codes, the kernel's default zero point everywhere, and the offsets as extra blocks
    in two levels; through [x, block means…] it applies the Q4_1 weight within a small part of a step — where one
    level is off by several times more. Each level starts on a whole block and codes each mean once."""
    rng = np.random.default_rng(6)
    w = q4_1(rng.normal(size=(24, 160)).astype(np.float32) / 10)  # 5 blocks: one extra block per level
    qw = weight_on_grid(w, 4)
    folded, coarse = fold_offset(qw), fold_offset(qw, levels=1)
    assert folded.offset is None and folded.codes.shape == (24, 160 + 64) and folded.scale.shape == (24, 7)
    np.testing.assert_array_equal(folded.codes[:, :160], qw.codes)
    assert (folded.zero_point == 8).all()
    step = qw.scale.max()
    error = np.abs(unfold_offset(folded.dequantize().astype(np.float64), 160, 32) - w).max()
    one_level = np.abs(coarse.dequantize()[:, :160] + (coarse.dequantize()[:, 160:165] / 32).repeat(32, axis=1)
                       - w).max()
    assert error < 0.05 * step and one_level > 3 * error
    # [x, M ×8] = 160 + 40 columns: level 1 the block at 160 (means 0–4, then repeats coded 0), level 2 from 192
    assert offset_columns(160, 32) == 40
    coded = folded.codes[:, 160:] != 8
    assert not coded[:, 5:32].any() and not coded[:, 32 + 5:].any()


@pytest.mark.parametrize("layout,rank", [("in_out", 2), ("out_in", 2), ("in_out", 3)])
def test_offset_blocks_run_as_one_matmulnbits_per_linear_over_a_shared_extended_input(layout, rank):
    """``offset_form="blocks"``: the block means made once per input (an AveragePool, through a [N, 1, K] view at
    rank 2), then one MatMulNBits per linear without zero points (no offset term, no Add but a Gemm's bias);
    outputs far nearer the exact x·Wᵀ than integer zero points get."""
    rng = np.random.default_rng(1)
    model, weights, ws, bias = _two_linears(layout, rng, rank=rank)
    out, report = quantize_weights(model, weights, form="matmulnbits", offset_form="blocks")
    onnx.checker.check_model(out, full_check=True)
    ops = [node.op_type for node in out.graph.node]
    assert report["kept_source_grid"] == 2 and ops.count("MatMulNBits") == 2
    assert ops.count("AveragePool") == 1 and ops.count("Concat") == 1  # the means, made once
    assert ops.count("Reshape") == (2 if rank == 2 else 0) and "ReduceSum" not in ops and "Pad" not in ops
    assert "MatMul" not in ops and ops.count("Add") == (2 if layout == "out_in" else 0)
    assert all(len(node.input) == 3 for node in out.graph.node if node.op_type == "MatMulNBits")  # no zero points
    x = rng.normal(size=(3, 128) if rank == 2 else (1, 3, 128)).astype(np.float32)
    got = make_session(out.SerializeToString()).run(None, {"x": x})
    for i, w in enumerate(ws):
        want = x @ w.T + bias
        qw = weights[f"lin{i}"][1]  # the same codes with integer zero points (the nearest) and nothing more:
        zp = np.clip(np.rint(qw.zero_point - qw.offset / qw.scale), 0, 15)
        rounded_only = x @ ((qw.codes - np.repeat(zp, 32, axis=1)) * np.repeat(qw.scale, 32, axis=1)).T + bias
        err = np.abs(got[i] - want).max()
        assert 0 < err < np.abs(rounded_only - want).max() / 10


def _gridded(hf) -> torch.nn.Module:
    """``hf`` with every decoder linear's weight replaced by its Q4_1 values (a GGUF loaded as float)."""
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(torch.from_numpy(q4_1(mod.weight.numpy())))
    return hf


def _logits(model, ids, layers):
    sess = make_session(model.SerializeToString())
    return sess.run(None, feeds_for(sess, ids, layers))[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_q4_1_model_compiles_to_w4_without_weight_loss(family):
    """W4A16 of a model whose weights are Q4_1 values: the compiled logits equal the source's (float rounding);
    requantizing them (`--source-grid requantize`, RTN) is far off. W4A4KV keeps them too, folding no
    reorder into a weight's inputs (R3, R5 stay labels)."""
    hf = random_opt(seed=3, hidden_size=128, num_attention_heads=4, ffn_dim=256) if family == "opt" else \
        random_llama(seed=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    graph = to_onnx(_gridded(hf), with_past=False)
    layers = find_layers(graph)
    ids = np.random.default_rng(0).integers(0, 300, (2, 32))
    ref = _logits(graph, ids, layers)
    calib = CalibConfig(nsamples=2, seqlen=32)
    err = {}
    for grid in ("keep", "requantize"):
        cfg = CompileConfig(quant=QuantSpec(wbits=4, abits=16, weight_quant="rtn", group_size=32, source_grid=grid),
                            calib=calib)
        compiled = compile_graph(graph, layers, ids, cfg)
        assert compiled.quant.weights.kept_source_grid == (len(layers) * len(layers[0].linears()) if grid == "keep" else 0)
        err[grid] = float(np.abs(_logits(compiled.model, ids, layers) - ref).max())
    assert err["keep"] < 1e-3 * np.abs(ref).max() and err["requantize"] > 20 * err["keep"], err

    cfg = CompileConfig(preset="W4A4KV", quant=QuantSpec.for_preset("W4A4KV", weight_quant="gptq"), calib=calib,
                        clusters=ClusterCounts(R1=4, R4=4, R5=4))
    compiled = compile_graph(graph, layers, ids, cfg)
    assert compiled.config.quant.source_grid == "keep" and not compiled.calibration.xtx  # no Hessians needed
    assert compiled.quant.weights.kept_source_grid == len(layers) * len(layers[0].linears())
    assert compiled.fold.permuted_initializers == (4 * len(layers) if family == "opt" else 0)  # OPT: q/k out + bias
    rows = classify(compiled.model)  # inspect --placement's verdicts, from the graph
    assert all(r["kind"] == "real" for r in rows if r["op"] == "MatMulNBits")
    small = [r for r in rows if "source grid" in r["verdict"]]  # an offset term per linear, block sums per input
    assert len(small) == compiled.quant.weights.kept_source_grid + 4 * len(layers)


@pytest.mark.slow
def test_grid_offset_blocks_compiles_a_q4_1_llama_to_one_kernel_per_linear():
    """``--grid-offset blocks`` on a Q4_1 Llama. W4A16: the layers are found again in the compiled graph
    (inspect reads it) and the logits sit ten times nearer the exact offset terms' than RTN's. W4A4KV with fused attention: no offset term is
    left, one MatMulNBits per linear, and the logits sit much nearer the exact offset terms' than a requantized
    model's."""
    hf = random_llama(seed=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    graph = to_onnx(_gridded(hf), with_past=True)
    layers = find_layers(graph)
    ids = np.random.default_rng(0).integers(0, 300, (2, 32))
    calib = CalibConfig(nsamples=2, seqlen=32)
    w4 = {form: compile_graph(graph, layers, ids, CompileConfig(
        quant=QuantSpec(wbits=4, abits=16, group_size=32, weight_quant="rtn", grid_offset="term" if form == "requantize" else form,
                        source_grid="requantize" if form == "requantize" else "keep"), calib=calib)).model
          for form in ("term", "blocks", "requantize")}
    found = find_layers(w4["blocks"])
    assert [lin.in_features for lin in found[0].linears().values()] == [lin.in_features for lin in layers[0].linears().values()]
    exact = _logits(w4["term"], ids, layers)
    gap = {form: float(np.abs(_logits(w4[form], ids, layers) - exact).max()) for form in ("blocks", "requantize")}
    assert 0 < gap["blocks"] < gap["requantize"] / 10, gap

    logits, compiled = {}, {}
    for form in ("term", "blocks", "requantize"):
        quant = QuantSpec.for_preset("W4A4KV", grid_offset="term" if form == "requantize" else form, weight_quant="rtn",
                                     group_size=32, source_grid="requantize" if form == "requantize" else "keep")
        cfg = CompileConfig(preset="W4A4KV", quant=quant, calib=calib, attention="fused",
                            clusters=ClusterCounts(R1=4, R4=4, R5=4))
        compiled[form] = compile_graph(graph, layers, ids, cfg)
        logits[form] = _logits(compiled[form].model, ids, layers)
    model = compiled["blocks"].model
    assert compiled["blocks"].quant.weights.kept_source_grid == len(layers) * len(layers[0].linears())
    assert not any(n.name.endswith((".offset_term", ".add_offset")) for n in model.graph.node)
    kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits" and ".with_block_means" in n.input[0]]
    assert len(kernels) == len(layers) * len(layers[0].linears())  # all but the 8-bit head (packing: test_pack_qkv)
    assert sum("extra 4-bit blocks" in r["verdict"] for r in classify(model)) == len(kernels)
    # the 4-bit cache rounds a slightly other K/V to other codes now and then, so compare mean gaps
    gap = {form: float(np.abs(logits[form] - logits["term"]).mean()) for form in ("blocks", "requantize")}
    assert 0 < gap["blocks"] < gap["requantize"] / 3, gap


def test_a_grid_through_zero_takes_an_integer_zero_point_and_no_offset():
    """Q4_0-like blocks, d·(q − 8): integer zero points, nothing to add at run time."""
    rng = np.random.default_rng(4)
    d = rng.uniform(1e-3, 1e-2, (16, 4, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (16, 4, 32))
    w = (d * (q - 8)).astype(np.float32).reshape(16, 128)
    qw = weight_on_grid(w, 4)
    assert qw is not None and qw.offset is None
    np.testing.assert_allclose(qw.dequantize(), w, rtol=0, atol=1e-7)


def test_at_8_bits_only_a_grid_without_offsets_is_kept():
    """Q4_1 values fit an 8-bit grid only with float offsets, which cost memory for little gain at 8 bits;
    a grid through 0 (Q8_0-like) is kept at 8 bits, and Q4_1 at 4."""
    from rptq_onnx.quantize import kept_grid

    rng = np.random.default_rng(5)
    w = q4_1(rng.normal(size=(8, 64)).astype(np.float32))
    assert kept_grid(w, 4) is not None and kept_grid(w, 8) is None
    q8 = (rng.integers(-127, 128, (8, 64)) * 1e-3).astype(np.float32)
    assert kept_grid(q8, 8) is not None and kept_grid(q8, 8).offset is None


def test_integer_zero_points_move_each_q4_1_grid_by_under_half_a_step():
    """``--source-grid keep-mlp``'s grid for the attention linears: each Q4_1 block's step, its zero point rounded to a
    whole code (so codes on it are off the source's values by under half a step); a block of one sign takes the
    step reaching its far end from 0 instead."""
    from rptq_onnx.quant import quantize_gptq, quantize_on_grid
    from rptq_onnx.source_grid import integer_zero_points

    rng = np.random.default_rng(7)
    w = q4_1(rng.standard_normal((24, 128)).astype(np.float32))
    w[0, :32] = np.abs(w[0, :32]) + 0.5  # a block above 0
    w = q4_1(w)
    kept = find_grid(w, 4, 32)
    scale, zp = integer_zero_points(kept)
    assert zp.dtype == np.uint8 and zp.max() <= 15
    ordinary = np.ones_like(zp, bool)
    ordinary[0, 0] = False
    np.testing.assert_array_equal(scale[ordinary], kept.scale[ordinary])
    assert zp[0, 0] == 0 and np.isclose(scale[0, 0], w[0, :32].max() / 15)
    on = quantize_on_grid(w, scale, zp, 4, 32)
    step = np.repeat(scale, 32, axis=1)
    assert np.all(np.abs(on.dequantize() - w)[:, 32:] <= 0.5 * step[:, 32:] + 1e-6)
    # GPTQ with the grid fixed chooses codes only: same scales and zero points; the identity Hessian gives RTN's codes
    fixed = quantize_gptq(w, np.eye(128, dtype=np.float32), 4, 32, grid=(scale, zp))
    np.testing.assert_array_equal(fixed.scale, scale)
    np.testing.assert_array_equal(fixed.zero_point, zp)
    np.testing.assert_array_equal(fixed.codes, on.codes)


@pytest.mark.slow
def test_keep_mlp_gives_the_attention_linears_integer_zero_points_and_their_inputs_no_extension():
    """``--source-grid keep-mlp`` with ``--grid-offset blocks`` on a Q4_1 Llama. W4A4KV, fused: the MLP's MatMulNBits
    read extended inputs (exact codes), the attention's the plain input with a zero-point input, and the 4-bit head's
    codes are GPTQ's. W4A16: an attention kernel holds the source's values moved by under half a step."""
    hf = random_llama(seed=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    graph = to_onnx(_gridded(hf), with_past=True)
    layers = find_layers(graph)
    ids = np.random.default_rng(0).integers(0, 300, (2, 32))
    calib = CalibConfig(nsamples=2, seqlen=32)
    quant = QuantSpec.for_preset("W4A4KV", grid_offset="blocks", group_size=32, source_grid="keep-mlp", head_bits=4)
    compiled = compile_graph(graph, layers, ids, CompileConfig(preset="W4A4KV", quant=quant, calib=calib,
                                                               attention="fused", clusters=ClusterCounts(R1=4, R4=4, R5=4)))
    assert compiled.quant.weights.kept_source_grid == 3 * len(layers)  # gate, up, down
    kernels = [n for n in compiled.model.graph.node if n.op_type == "MatMulNBits" and not n.name.startswith("rptq.head")]
    extended = [n for n in kernels if ".with_block_means" in n.input[0]]
    plain = [n for n in kernels if n not in extended]
    assert len(extended) == 3 * len(layers) and len(plain) == 4 * len(layers)  # q, k, v, o (packing: test_pack_qkv)
    assert all(len(n.input) > 3 and n.input[3] for n in plain), "the attention's codes carry integer zero points"
    assert compiled.quant.head.codes == "gptq"

    # W4A16 (nothing reordered): each attention kernel holds the source's values moved by less than half a step
    w4 = compile_graph(graph, layers, ids, CompileConfig(quant=QuantSpec(
        wbits=4, abits=16, group_size=32, grid_offset="blocks", source_grid="keep-mlp"), calib=calib)).model
    inits = {t.name: numpy_helper.to_array(t) for t in w4.graph.initializer}
    source = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for role in ("q_proj", "out_proj"):
        lin = layers[0].linears()[role]
        w = source[lin.weight] if lin.weight_layout == "out_in" else source[lin.weight].T
        node = next(n for n in w4.graph.node if n.op_type == "MatMulNBits" and n.name == f"rptq.w.{lin.node}.matmulnbits")
        step = np.repeat(inits[node.input[2]].reshape(w.shape[0], -1), 32, axis=1)
        got = dequantize_matmulnbits(inits[node.input[1]], inits[node.input[2]], inits[node.input[3]], w.shape[1],
                                     w.shape[0], 4, 32)
        assert np.all(np.abs(got - w) <= 0.5 * step + 1e-6) and not np.allclose(got, w, atol=1e-7), role
