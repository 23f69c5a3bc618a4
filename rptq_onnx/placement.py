"""Deployment truth (`rptq-onnx inspect MODEL --placement`): what ONNX Runtime really runs in low bits.

For every MatMul / Gemm / MatMulNBits and every Quantize/DequantizeLinear of a model, a verdict
from the graph (what the node computes), and the execution provider ONNX Runtime assigned it,
read from a session profile of one short prefill. Nodes that are absent from the profile were
fused or constant-folded by ORT's graph optimizer (e.g. a DequantizeLinear of a constant weight
is folded into a float initializer at session creation).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from rptq_onnx.graph import GraphIndex, load_model, node_attr
from rptq_onnx.outdir import work_dir
from rptq_onnx.passes.quantize_head import embedding_gather
from rptq_onnx.vocabulary import KV_PREFIX, WEIGHT_PREFIX, WITH_BLOCK_SUMS_PREFIX

GEMMS = ("MatMul", "Gemm", "MatMulNBits")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def classify(model: onnx.ModelProto) -> list[dict]:
    """A verdict per GEMM and per Q/DQ node, from the graph alone."""
    index = GraphIndex(model)
    embedding = embedding_gather(index)
    rows = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.startswith(WEIGHT_PREFIX):
            rows.append({"node": node.name, "op": node.op_type, "kind": "float",
                         "verdict": "float GEMM, small: block sums / per-block offsets of codes kept from a source "
                                    "grid (1/block_size of the linear's work)"})
        elif node.op_type in GEMMS:
            rows.append({"node": node.name, "op": node.op_type, **_gemm_verdict(index, node)})
        elif node.op_type in QDQ:
            rows.append({"node": node.name, "op": node.op_type, **_qdq_verdict(index, node)})
        elif node.op_type == "GroupQueryAttention":
            rows.append({"node": node.name, "op": node.op_type, **_attention_verdict(node)})
        elif node.op_type == "GatherBlockQuantized":
            bits = node_attr(node, "bits", 4)
            rows.append({"node": node.name, "op": node.op_type, "kind": "real",
                         "verdict": f"real low-bit kernel: token embedding gathered from {bits}-bit codes "
                                    "(GatherBlockQuantized)"})
        elif node is embedding:
            rows.append({"node": node.name, "op": node.op_type, "kind": "float",
                         "verdict": "float token embedding table"})
    return rows


def _attention_verdict(node: onnx.NodeProto) -> dict:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits = attrs.get("kv_cache_bit_width", 0)
    if bits:
        return {"kind": "real", "verdict": f"real low-bit kernel: fused attention over an int{bits} KV cache "
                                           "(GroupQueryAttention, per-channel scales)"}
    return {"kind": "float", "verdict": "fused attention, float KV cache (GroupQueryAttention)"}


def _gemm_verdict(index: GraphIndex, node: onnx.NodeProto) -> dict:
    if node.op_type == "MatMulNBits":
        verdict = f"real low-bit kernel: MatMulNBits, {node_attr(node, 'bits', 4)}-bit weights"
        if node_attr(node, "accuracy_level", 0) == 4:
            verdict += ", input quantized to int8 per block (integer GEMM)"
        extended = index.producer.get(node.input[0])
        if extended is not None and extended.name.startswith(WITH_BLOCK_SUMS_PREFIX):
            verdict += "; a source grid's per-block offsets in extra 4-bit blocks over the input's block means"
        return {"kind": "real", "verdict": verdict}
    producers = [_source_dq(index, t) for t in node.input[:2]]
    weight_dq = [p for p in producers if p is not None and index.is_constant(p.input[0])]
    act_dq = [p for p in producers if p is not None and not index.is_constant(p.input[0])]
    if weight_dq:
        verdict = "simulated: low-bit weights dequantized to float, float GEMM"
        if act_dq:
            verdict += "; activation fake-quantized"
        return {"kind": "simulated", "verdict": verdict}
    if act_dq:
        return {"kind": "simulated", "verdict": "simulated: fake-quantized activation, float GEMM"}
    return {"kind": "float", "verdict": "float GEMM"}


# ops that move or rescale values without leaving their grid (attention reshapes, the cache concat, the GQA
# repeat of K/V, q scaling)
_PASS_THROUGH = ("Reshape", "Transpose", "Concat", "Squeeze", "Unsqueeze", "Expand", "Identity", "Mul", "Div")


def _source_dq(index: GraphIndex, tensor: str, depth: int = 6) -> onnx.NodeProto | None:
    """The DequantizeLinear a GEMM input comes from, through data-movement ops (None if it is float)."""
    node = index.producer.get(tensor)
    if node is None or depth == 0:
        return None
    if node.op_type == "DequantizeLinear":
        return node
    dynamic = index.dynamic_inputs(node)
    if node.op_type not in _PASS_THROUGH or (node.op_type in ("Mul", "Div") and len(dynamic) != 1):
        return None
    for t in dynamic if node.op_type == "Concat" else dynamic[:1]:
        found = _source_dq(index, t, depth - 1)
        if found is not None:
            return found
    return None


def _qdq_verdict(index: GraphIndex, node: onnx.NodeProto) -> dict:
    name = node.name
    if name.startswith(KV_PREFIX):
        return {"kind": "real", "verdict": "KV cache storage: low-bit codes held between decode steps"}
    if name.startswith(WEIGHT_PREFIX) or (node.op_type == "DequantizeLinear" and index.is_constant(node.input[0])):
        return {"kind": "weights", "verdict": "weight dequantize: low-bit in the file, float for the GEMM"}
    return {"kind": "simulated", "verdict": "activation fake-quantization (simulated, float math after it)"}


def assigned_providers(model_path: Path, providers: list[str] | None = None, seqlen: int = 8) -> dict[str, str]:
    """node name → execution provider, from a profiled prefill of ``seqlen`` tokens."""
    from rptq_onnx.runtime import as_ort_values, feeds_for, make_session

    with work_dir("profile") as tmp:
        session = make_session(model_path, providers=providers, profile_prefix=os.path.join(tmp, "profile"))
        ids = np.full((1, seqlen), 5, np.int64)
        session.run_with_ort_values(None, as_ort_values(feeds_for(session, ids)))  # 4-bit outputs too
        profile = Path(session.end_profiling())
        events = json.loads(profile.read_text())
    out = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            out[ev["name"][: -len("_kernel_time")]] = args["provider"]
    return out


def placement(model_path: str | os.PathLike, providers: list[str] | None = None) -> dict:
    path = Path(model_path)
    path = path / "model.onnx" if path.is_dir() else path
    model = load_model(path, load_weights=False)
    rows = classify(model)
    eps = assigned_providers(path, providers)
    for row in rows:
        row["provider"] = eps.get(row["node"], "fused or constant-folded by ORT")
        if row["kind"] == "weights" and row["node"] not in eps:
            row["verdict"] = "weight dequantize: constant-folded by ORT at session creation, float weights in memory"
    gemms = [r for r in rows if r["op"] in GEMMS]
    return {"model": str(path), "providers_requested": providers, "rows": rows,
            "summary": {"gemms": len(gemms), "matmulnbits": sum(r["op"] == "MatMulNBits" for r in gemms),
                        "by_kind": dict(Counter(f"{r['op']}: {r['kind']}" for r in rows)),
                        "by_provider": dict(Counter(r["provider"] for r in rows))}}


def format_placement(report: dict) -> str:
    lines = [f"placement of {report['model']} (providers {', '.join(report['providers_requested'] or ['default'])})", ""]
    width = max((len(r["node"]) for r in report["rows"]), default=10)
    lines.append(f"{'node':{width}s}  {'op':16s}  {'provider':32s}  verdict")
    for r in report["rows"]:
        lines.append(f"{r['node']:{width}s}  {r['op']:16s}  {r['provider']:32s}  {r['verdict']}")
    s = report["summary"]
    lines += ["", f"{s['gemms']} GEMMs, {s['matmulnbits']} MatMulNBits (real low-bit kernels); "
              + ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items())),
              "providers: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_provider"].items()))]
    return "\n".join(lines)
