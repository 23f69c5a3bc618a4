"""passes/quantize_head.py on small inline graphs: the vocabulary table as MatMulNBits + GatherBlockQuantized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rptq_onnx.runtime import feeds_for
from rptq_onnx.errors import RptqError
from rptq_onnx.passes.quantize_head import QuantizeHead, find_vocab_tables, quantize_head
from rptq_onnx.observers import SHRINKS
from rptq_onnx.quant import quantize_symmetric
from rptq_onnx.runtime import make_session

VOCAB, HIDDEN = 96, 64


def lm(tied: bool = True, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """input_ids → Gather(E) → Tanh → MatMul(·, Wᵀ) → logits; tied: W = E (read through a Transpose)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    head = emb if tied else rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="embedding"),
             helper.make_node("Tanh", ["h"], ["x"], name="body")]
    inits = [numpy_helper.from_array(emb, "embed")]
    if tied:
        nodes += [helper.make_node("Transpose", ["embed"], ["embed_t"], name="t", perm=[1, 0]),
                  helper.make_node("MatMul", ["x", "embed_t"], ["logits"], name="lm_head")]
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(head.T), "head_w"))
        nodes.append(helper.make_node("MatMul", ["x", "head_w"], ["logits"], name="lm_head"))
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), emb, head


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    return make_session(model.SerializeToString()).run(["logits"], {"input_ids": ids})[0]


IDS = np.array([[0, 5, 95, 17], [3, 3, 40, 1]], np.int64)


@pytest.mark.parametrize("tied", [True, False])
def test_finds_the_tables(tied):
    model, _, _ = lm(tied)
    t = find_vocab_tables(model)
    assert (t.head.name, t.embedding.name, t.tied) == ("lm_head", "embedding", tied)
    assert t.head_weight == ("embed" if tied else "head_w") and t.head_transposed == tied


@pytest.mark.parametrize("tied", [True, False])
def test_four_bit_head_and_embedding_equal_the_dequantized_tables(tied):
    model, emb, head = lm(tied)
    out, report = quantize_head(model, 4, block_size=32)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1
    assert "Gather" not in ops and "Transpose" not in ops and "MatMul" not in ops
    assert {t.name for t in out.graph.initializer}.isdisjoint({"embed", "head_w"}), "the float tables must be gone"
    assert report["tied"] == tied and report["embedding"] == "GatherBlockQuantized"
    head_node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    assert len(head_node.input) == 3, "4-bit codes are symmetric: no zero-point input (the kernel's faster path)"
    e = quantize_symmetric(emb, 4, 32, SHRINKS).dequantize().astype(np.float32)
    w = e if tied else quantize_symmetric(head, 4, 32, SHRINKS).dequantize().astype(np.float32)
    expected = np.tanh(e[IDS]) @ w.T
    np.testing.assert_allclose(run(out, IDS), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected, np.tanh(emb[IDS]) @ head.T, atol=1e-3), "4-bit codes must differ from float"
    # the input model is left as it was
    assert [n.op_type for n in model.graph.node].count("Gather") == 1


def test_four_bit_head_takes_the_linears_accuracy_level():
    """At level 4 the input is quantized to int8 per block inside the kernel: close to level 0, not equal."""
    model, _, _ = lm(True)
    exact, _ = quantize_head(model, 4, block_size=32)
    fast, _ = quantize_head(model, 4, block_size=32, accuracy_level=4)
    levels = [{a.name: helper.get_attribute_value(a) for a in n.attribute}.get("accuracy_level", 0)
              for m in (exact, fast) for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert levels == [0, 4]
    ref, got = run(exact, IDS), run(fast, IDS)
    assert 0 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


def test_eight_bit_head_is_close_to_float():
    """8 bits at accuracy level 4 (the input quantized to int8 per block): within a fraction of a percent."""
    model, emb, _ = lm(True)
    out, report = quantize_head(model, 8)
    node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4 and report["bits"] == 8
    ref = run(model, IDS)
    got = run(out, IDS)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_sixteen_bits_changes_nothing():
    model, _, _ = lm(True)
    out, report = quantize_head(model, 16)
    assert out is model and report == {"bits": 16}


def test_refusals_are_one_line():
    model, _, _ = lm(True)
    with pytest.raises(RptqError, match="use 4, 8 or 16"):
        quantize_head(model, 5)
    with pytest.raises(RptqError, match="power of two"):
        quantize_head(model, 4, block_size=48)
    for node in model.graph.node:
        if node.name == "lm_head":
            node.op_type = "Add"
    with pytest.raises(RptqError, match="does not come from a MatMul"):
        quantize_head(model, 4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_compiled_models_keep_the_vocabulary_table_in_low_bits(family, request):
    """Quantized-weight presets default to an 8-bit table; --head-bits 16 keeps it float, 4 packs it in 4 bits.
    The 8-bit table changes the logits by well under a percent; the 4-bit one more, and placement says so."""
    from rptq_onnx.graph import load_model
    from rptq_onnx.placement import classify

    compiled = request.getfixturevalue(f"compiled_text_{family}")
    ids = np.random.default_rng(0).integers(5, 200, (1, 12))

    def logits(head_bits):
        path = compiled("W4A16", head_bits=head_bits) / "model.onnx"
        session = make_session(str(path))
        return session.run(["logits"], feeds_for(session, ids))[0], load_model(path, load_weights=False)

    (l16, m16), (l8, m8), (l4, m4) = logits(16), logits(None), logits(4)
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    assert "GatherBlockQuantized" not in ops(m16) and ops(m8).count("GatherBlockQuantized") == 1
    assert ops(m4).count("GatherBlockQuantized") == 1
    err = lambda a: np.linalg.norm(a - l16) / np.linalg.norm(l16)  # noqa: E731
    assert 0 < err(l8) < 5e-2 and err(l8) < err(l4)
    assert "4-bit codes" in {r["op"]: r["verdict"] for r in classify(m4)}["GatherBlockQuantized"]
    assert {r["op"]: r["verdict"] for r in classify(m16)}["Gather"] == "float token embedding table"


def test_head_bits_flag_is_checked_before_any_work(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rptq_onnx", "compile", "-o", str(tmp_path / "out"), "--preset",
                           "W4A4KV", "--head-bits", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--head-bits" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_four_bit_head_with_a_hessian_takes_gptq_codes_on_the_same_steps():
    """Given the head input's Hessian, the 4-bit codes are GPTQ's on the RTN steps: the same scales, other codes,
    and a smaller output error on inputs like the Hessian's (correlated channels)."""
    model, emb, _ = lm(tied=True, seed=3)
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((HIDDEN, HIDDEN)) * np.linspace(0.1, 3, HIDDEN)
    x = rng.standard_normal((4096, HIDDEN)) @ mix  # correlated, uneven channels: where GPTQ pays
    hessian = (2 * x.T @ x / len(x)).astype(np.float32)
    rtn, rtn_report = quantize_head(model, 4, block_size=32)
    gptq = QuantizeHead(4, 32, hessian=hessian).run(model)
    report = gptq.report
    assert (rtn_report["codes"], report.codes) == ("rtn", "gptq")
    init = lambda m, n: numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == n))  # noqa: E731
    np.testing.assert_array_equal(init(gptq.model, "rptq.head.scales"), init(rtn, "rptq.head.scales"))
    assert not np.array_equal(init(gptq.model, "rptq.head.B"), init(rtn, "rptq.head.B"))

    def weights(m):  # the head's dequantized table from the kernel's own initializers
        from rptq_onnx.quant import dequantize_matmulnbits
        return dequantize_matmulnbits(init(m, "rptq.head.B"), init(m, "rptq.head.scales"), None, HIDDEN, VOCAB, 4, 32)

    err = {name: float(np.linalg.norm(x @ (weights(m) - emb).T)) for name, m in (("rtn", rtn), ("gptq", gptq.model))}
    assert err["gptq"] < 0.95 * err["rtn"], err
