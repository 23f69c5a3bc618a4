"""passes/pack_qkv.py: q/k/v as one MatMulNBits feeding GroupQueryAttention's packed input, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rptq_onnx.anatomy import Linear
from rptq_onnx.passes.pack_qkv import initializers_read, pack_qkv
from rptq_onnx.passes.quantize_weights import quantize_weights
from rptq_onnx.quant import quantize_rtn
from rptq_onnx.runtime import make_session
from rptq_onnx.source_grid import weight_on_grid
from test_source_grid import q4_1

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, SEQ = 64, 4, 2, 16, 5


def _attention(grid: str | bool, q_scalar: float | None, cache_bits: int | None):
    """x → q/k/v linears (q: bias [× scalar], k: bias, v: none) → GQA over an empty cache; the linears as
    MatMulNBits with RTN codes (a zero-point input) or Q4_1 grids (``grid``: True or "term", offset terms;
    "blocks", the offsets inside the kernels over [x, block sums])."""
    rng = np.random.default_rng(0)
    nodes, inits, weights = [], [], {}
    outs = {}
    for name, n in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
        w = rng.normal(size=(n, HIDDEN)).astype(np.float32)
        w = q4_1(w) if grid else w
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.w"))
        nodes.append(helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}.mm"], name=f"{name}_proj"))
        weights[f"{name}_proj"] = (Linear(f"{name}_proj", "MatMul", "x", f"{name}.mm", f"{name}.w", "in_out", None, None,
                                          HIDDEN, n), weight_on_grid(w, 4) if grid else quantize_rtn(w, 4, 32))
        out = f"{name}.mm"
        if name != "v":
            inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), f"{name}.b"))
            nodes.append(helper.make_node("Add", [out, f"{name}.b"], [f"{name}.biased"], name=f"{name}_bias"))
            out = f"{name}.biased"
        if name == "q" and q_scalar is not None:
            inits.append(numpy_helper.from_array(np.array(q_scalar, np.float32), "q.scalar"))
            nodes.append(helper.make_node("Mul", [out, "q.scalar"], ["q.scaled"], name="q_scale"))
            out = "q.scaled"
        outs[name] = out
    attrs = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, scale=float(HEAD_DIM ** -0.5))
    scales = []
    cache = TensorProto.FLOAT
    width = HEAD_DIM
    if cache_bits:
        cache, width = TensorProto.UINT8, HEAD_DIM // 2
        for t in ("k", "v"):
            inits.append(numpy_helper.from_array(np.full(KV_HEADS * HEAD_DIM, 0.4, np.float32), f"{t}.cache_scale"))
        scales = ["k.cache_scale", "v.cache_scale"]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=cache_bits)
    nodes.append(helper.make_node(
        "GroupQueryAttention", [outs["q"], outs["k"], outs["v"], "past_k", "past_v", "seqlens", "total", "", "", "", "",
                                "", *scales], ["attn", "present_k", "present_v"], name="rptq.attn.L0.gqa",
        domain="com.microsoft", **attrs))
    past = [helper.make_tensor_value_info(n, cache, [1, KV_HEADS, 0, width]) for n in ("past_k", "past_v")]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, HIDDEN]), *past,
                             helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
                             helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("attn", TensorProto.FLOAT, [1, SEQ, HEADS * HEAD_DIM]),
         *(helper.make_tensor_value_info(n, cache, [1, KV_HEADS, SEQ, width]) for n in ("present_k", "present_v"))],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    model, report = quantize_weights(model, weights, form="matmulnbits", offset_form="blocks" if grid == "blocks" else "term")
    assert report["matmulnbits"] == 3 and report["kept_source_grid"] == (3 if grid else 0)
    return model


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    cache = next(i for i in model.graph.input if i.name == "past_k").type.tensor_type
    dtype = np.float32 if cache.elem_type == TensorProto.FLOAT else np.uint8
    empty = np.zeros([d.dim_value for d in cache.shape.dim], dtype)
    x = np.random.default_rng(1).normal(size=(1, SEQ, HIDDEN)).astype(np.float32)
    return make_session(model.SerializeToString()).run(None, {"x": x, "past_k": empty, "past_v": empty,
                                                              "seqlens": np.array([SEQ - 1], np.int32),
                                                              "total": np.array(SEQ, np.int32)})


@pytest.mark.parametrize("grid,q_scalar,cache_bits", [(False, None, None), (True, 0.5, None), (True, None, 4),
                                                      (False, 0.3, 4), ("blocks", 0.5, None), ("blocks", None, 4)])
def test_packed_qkv_computes_what_three_linears_did(grid, q_scalar, cache_bits):
    model = _attention(grid, q_scalar, cache_bits)
    packed, report = pack_qkv(model)
    assert report == {"layers": 1, "skipped": 0}
    onnx.checker.check_model(packed)
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("MatMulNBits") == 1 and "Mul" not in ops
    # one block sum and one offset term for all three; or the block sums and [x, block sums] the kernel reads
    assert ops.count("MatMul") == {False: 0, True: 2, "blocks": 0}[grid] and ops.count("Concat") == (grid == "blocks")
    gqa = next(n for n in packed.graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.input[1:3]) == ["", ""]
    kernel = next(n for n in packed.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: helper.get_attribute_value(a) for a in kernel.attribute}["N"] == (HEADS + 2 * KV_HEADS) * HEAD_DIM
    before, after = _run(model), _run(packed)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-5 * np.abs(before[0]).max())
    if cache_bits:  # the kernel's own quantization of the same K/V: the same codes
        assert (after[1] == before[1]).mean() > 0.99 and (after[2] == before[2]).mean() > 0.99
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 3, "the input model is left as it was"


def test_a_chain_it_cannot_pack_is_left_and_counted():
    model = _attention(False, None, None)
    k = next(n for n in model.graph.node if n.op_type == "Add" and n.name == "k_bias")
    model.graph.node.append(helper.make_node("Relu", [k.output[0]], ["k.relu"], name="k_relu"))  # k read twice
    model.graph.output.append(helper.make_tensor_value_info("k.relu", TensorProto.FLOAT, None))
    packed, report = pack_qkv(model)
    assert report == {"layers": 0, "skipped": 1}
    assert [n.op_type for n in packed.graph.node].count("MatMulNBits") == 3


def test_what_it_reads_is_found_without_reading_weights(tmp_path):
    """A layer-wise compile asks which tensors to load back from disk before any is loaded."""
    model = _attention(True, 0.5, None)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    skeleton = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    gqa = next(n.name for n in skeleton.graph.node if n.op_type == "GroupQueryAttention")
    reads = initializers_read(skeleton, gqa)
    kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert reads == ({t for k in kernels for t in k.input[1:] if t} | {"q.b", "k.b", "q.scalar"}
                     | {n.input[1] for n in model.graph.node if n.name.endswith(".offset_term")})
