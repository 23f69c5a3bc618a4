"""`inspect --placement`: every GEMM and Q/DQ with its verdict and the provider ORT assigned it."""

from __future__ import annotations

import json

import onnx
import pytest

from rptq_onnx.placement import placement
from test_cli import run_cli

pytestmark = pytest.mark.slow  # every test here exports or compiles a model


def test_every_weight_preset_runs_matmulnbits(compiled_text_opt):
    """Every weight preset keeps its linears (activation Q/DQ in front or not) and its vocabulary table packed:
    MatMulNBits and GatherBlockQuantized on the CPU EP; nothing is dequantized to float."""
    for preset in ("W4A16", "W4A8", "W4A4", "W4A4KV", "W8A8"):
        report = placement(compiled_text_opt(preset))
        nbits = [r for r in report["rows"] if r["op"] == "MatMulNBits"]
        assert len(nbits) == 6 * 2 + 1  # six linears per layer, two layers, and the LM head
        assert all(r["kind"] == "real" and r["provider"] == "CPUExecutionProvider" for r in nbits)
        assert not [r for r in report["rows"] if r["kind"] == "weights"]  # nothing dequantized to float
        embedding = [r for r in report["rows"] if r["op"] == "GatherBlockQuantized"]
        assert len(embedding) == 1 and embedding[0]["kind"] == "real"
        assert embedding[0]["provider"] == "CPUExecutionProvider"
        eight_bit = [r for r in nbits if "8-bit weights" in r["verdict"]]
        assert len(eight_bit) == (13 if preset == "W8A8" else 1)  # the head is 8-bit by default
        assert all("int8 per block" in r["verdict"] for r in eight_bit)
    gemms = [r for r in placement(compiled_text_opt("W4A8"))["rows"] if r["op"] in ("MatMul", "Gemm")]
    assert [r["kind"] for r in gemms] == ["simulated"] * 2 * 2  # QKᵀ and PV on fake-quantized q/k/P/v


def test_dequantize_linear_weights_are_folded_to_float(compiled_text_opt):
    """--no-matmulnbits: the weights are DequantizeLinear codes, which ORT constant-folds to float (and the
    vocabulary table stays float: no contrib kernel unless --head-bits asks for one)."""
    report = placement(compiled_text_opt("W4A8", matmulnbits=False))
    assert report["summary"]["matmulnbits"] == 0
    gemms = [r for r in report["rows"] if r["op"] in ("MatMul", "Gemm")]
    assert len([r for r in gemms if "low-bit weights" in r["verdict"]]) == 6 * 2


def test_every_gemm_and_qdq_is_listed(compiled_text_opt):
    path = compiled_text_opt("W4A4KV") / "model.onnx"
    graph = onnx.load(path)
    want = sorted(n.name for n in graph.graph.node
                  if n.op_type in ("MatMul", "Gemm", "MatMulNBits", "QuantizeLinear", "DequantizeLinear",
                                   "GatherBlockQuantized"))
    report = placement(path)
    assert sorted(r["node"] for r in report["rows"]) == want
    kv = [r for r in report["rows"] if r["node"].startswith("rptq.kv.")]
    assert kv and all(r["kind"] == "real" for r in kv)
    # weight DequantizeLinear of constants is folded by ORT at session creation: float weights in memory
    weights = [r for r in placement(compiled_text_opt("W4A4KV", matmulnbits=False))["rows"] if r["kind"] == "weights"]
    assert weights and all("constant-folded" in r["verdict"] for r in weights)


def test_cli_placement(compiled_text_opt):
    proc = run_cli("inspect", compiled_text_opt("W4A16"), "--placement", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["summary"]["matmulnbits"] >= 1
    table = run_cli("inspect", compiled_text_opt("W4A16"), "--placement")
    assert "MatMulNBits" in table.stdout and "real low-bit kernel" in table.stdout
