"""`inspect --placement`: every GEMM and Q/DQ with its verdict and the provider ORT assigned it."""

from __future__ import annotations

import json

import onnx

from rptq_onnx.placement import placement
from test_cli import run_cli


def test_w4a16_runs_matmulnbits_and_w4a8_does_not(compiled_text_opt):
    w4a16 = placement(compiled_text_opt("W4A16"))
    nbits = [r for r in w4a16["rows"] if r["op"] == "MatMulNBits"]
    assert nbits and all(r["kind"] == "real" and r["provider"] == "CPUExecutionProvider" for r in nbits)
    w4a8 = placement(compiled_text_opt("W4A8"))
    assert w4a8["summary"]["matmulnbits"] == 0
    gemms = [r for r in w4a8["rows"] if r["op"] in ("MatMul", "Gemm")]
    weights = [r for r in gemms if "low-bit weights" in r["verdict"]]
    assert len(weights) == 6 * 2  # six linears per layer, two layers
    assert sum(r["kind"] == "simulated" for r in gemms) == 8 * 2  # + QKᵀ and PV on fake-quantized q/k/P/v


def test_every_gemm_and_qdq_is_listed(compiled_text_opt):
    path = compiled_text_opt("W4A4KV") / "model.onnx"
    graph = onnx.load(path)
    want = sorted(n.name for n in graph.graph.node
                  if n.op_type in ("MatMul", "Gemm", "MatMulNBits", "QuantizeLinear", "DequantizeLinear"))
    report = placement(path)
    assert sorted(r["node"] for r in report["rows"]) == want
    kv = [r for r in report["rows"] if r["node"].startswith("rptq.kv.")]
    assert kv and all(r["kind"] == "real" for r in kv)
    # weight DequantizeLinear of constants is folded by ORT at session creation: float weights in memory
    weights = [r for r in report["rows"] if r["kind"] == "weights"]
    assert weights and all("constant-folded" in r["verdict"] for r in weights)


def test_cli_placement(compiled_text_opt):
    proc = run_cli("inspect", compiled_text_opt("W4A16"), "--placement", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["summary"]["matmulnbits"] >= 1
    table = run_cli("inspect", compiled_text_opt("W4A16"), "--placement")
    assert "MatMulNBits" in table.stdout and "real low-bit kernel" in table.stdout
