"""Peak memory of one ONNX Runtime session holding a model, after one prefill.

    python -m rptq_onnx.tools.bench_rss EXPORT_DIR [--presets W4A4KV,W4A8,W8A8] [--attention auto|eager]
        [--head-bits default,16,4] [--compiled DIR ...] [--tokens 512] [--calib sotu-train]

EXPORT_DIR is an exported model (``rptq-onnx export``); each preset is compiled from it (RTN
weights: memory does not depend on how the codes were chosen), or pass already compiled
directories with ``--compiled``. Every model is measured in a fresh process: load the session,
run one prefill of ``--tokens`` tokens (batch 1), report the process's peak RSS. Ratios are ÷
the export's. ORT constant-folds DequantizeLinear weights to float at session creation, so only
weights stored as MatMulNBits stay low-bit in memory; the table says how many linears are.
``--head-bits``: one row per preset and vocabulary-table width (``default``: the preset's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys
import numpy as np
from rptq_onnx.runtime import as_ort_values, feeds_for, make_session
path, tokens = sys.argv[1], int(sys.argv[2])
session = make_session(path)
ids = np.random.default_rng(0).integers(10, 1000, (1, tokens))
session.run_with_ort_values(["logits"], as_ort_values(feeds_for(session, ids)))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from a large parent inherits it
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def peak_rss_mb(model: Path, tokens: int) -> float:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(tokens)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"measuring {model} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _linears(model: Path) -> tuple[int, int]:
    """(MatMulNBits nodes, weight DequantizeLinear nodes) of a model."""
    import onnx

    from rptq_onnx.vocabulary import WEIGHT_PREFIX

    nodes = onnx.load(str(model), load_external_data=False).graph.node
    return (sum(n.op_type == "MatMulNBits" for n in nodes),
            sum(n.op_type == "DequantizeLinear" and n.name.startswith(WEIGHT_PREFIX) for n in nodes))


def _head(bits: int) -> str:
    return "float embedding/head" if bits == 16 else f"{bits}-bit embedding/head"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an exported model directory (model.onnx, tokenizer)")
    parser.add_argument("--presets", default="W4A4KV,W4A8,W8A8")
    parser.add_argument("--attention", default="auto", choices=("auto", "eager"),
                        help="auto (as compile): fused attention for the KV presets, eager for the others")
    parser.add_argument("--head-bits", default="default",
                        help="comma list of token embedding / LM head widths to compile each preset with: default (the "
                             "preset's), 16, 8, 4")
    parser.add_argument("--compiled", type=Path, nargs="*", default=[], help="compiled directories to measure too")
    parser.add_argument("--tokens", type=int, default=512, help="prefill length (default 512)")
    parser.add_argument("--calib", default="sotu-train")
    parser.add_argument("--no-matmulnbits", action="store_true", help="compile with DequantizeLinear weights")
    parser.add_argument("--keep", type=Path, default=None, help="keep the compiled models in this directory")
    args = parser.parse_args(argv)

    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec

    rows = [("FP32 export", args.export / "model.onnx")]
    with tempfile.TemporaryDirectory(prefix="rptq-bench-rss-") as tmp:
        tmp = args.keep or tmp
        for preset in filter(None, args.presets.split(",")):
            for head in args.head_bits.split(","):
                quant = QuantSpec.for_preset(preset, weight_quant="rtn", matmulnbits=not args.no_matmulnbits,
                                             head_bits=None if head == "default" else int(head))
                config = CompileConfig(preset=preset, quant=quant, attention=args.attention,
                                       calib=CalibConfig(source=args.calib, nsamples=4, seqlen=128))
                out = Path(tmp) / f"{preset}-head{head}"
                result = compile_model(str(args.export), out, config, progress=False)
                rows.append((f"{preset} ({result.report.config.attention} attention, "
                             f"{_head(quant.head_bits)})", out / "model.onnx"))
        rows += [(str(d), d / "model.onnx") for d in args.compiled]
        results = [(name, peak_rss_mb(path, args.tokens), *_linears(path)) for name, path in rows]
    base = results[0][1]
    print(f"\nPeak RSS of one ORT session after one prefill of {args.tokens} tokens ({args.export})\n")
    print("| model | peak RSS MB | ÷ FP32 export | MatMulNBits | DequantizeLinear weights (float in RAM) |")
    print("|---|---:|---:|---:|---:|")
    for name, rss, nbits, dq in results:
        print(f"| {name} | {rss:,.0f} | {rss / base:.2f} | {nbits} | {dq} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
