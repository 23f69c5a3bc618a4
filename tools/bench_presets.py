"""Compile every preset on one model and compare: size, MatMulNBits use, output error vs FP32.

    python -m rptq_onnx.tools.bench_presets [--model MODEL.onnx] [--calib random|FILE] [--nsamples 8]
        [--seqlen 128] [--presets W8A8,W4A4,...] [--weight-quant gptq] [--extra W4A16:rtn,W3A16:rtn,...]

Without --model it uses a random OPT with the opt-125m shapes (tools/bench_common.py). Each
compiled model passes onnx.checker's full check before it is run.
Error is measured on held-out windows (seed + 1) as the logits' mean squared error vs the
FP32 graph and the top-1 agreement. Random weights and tokens measure *mechanics* (does each
preset compile, run, and how much does it move the output); quality claims belong to real
models and text (tools/bench_quality.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rptq_onnx.tools.bench_common import add_calib_args, add_model_args, open_model


def main(argv: list[str] | None = None) -> int:
    from rptq_onnx.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_calib_args(parser)
    parser.add_argument("--presets", default=",".join(p for p in PRESETS if p != "reorder"))
    parser.add_argument("--weight-quant", default="gptq", choices=("gptq", "rtn"))
    parser.add_argument("--extra", default="W4A16:rtn,W4A16:gptq,W3A16:rtn,W3A16:gptq",
                        help="extra rows NAME:ALGO with NAME = W{w}A{a} (per-channel weights)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import onnx

    from rptq_onnx.calibrate import calibration_windows
    from rptq_onnx.compile import compile_model
    from rptq_onnx.runtime import feeds_for
    from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec
    from rptq_onnx.runtime import make_session

    bench = open_model(args)
    model, layers, vocab, max_pos = bench.path, bench.layers, bench.vocab, bench.max_positions
    held_out = calibration_windows(CalibConfig(source=args.calib, nsamples=4, seqlen=args.seqlen, seed=1),
                                   model.parent, vocab, max_pos)

    def logits(path):
        sess = make_session(path)
        return np.concatenate([sess.run(["logits"], feeds_for(sess, held_out[i:i + 2], layers))[0]
                               for i in range(0, len(held_out), 2)])

    ref = logits(model)
    jobs = [(p, QuantSpec.for_preset(p, weight_quant=args.weight_quant)) for p in args.presets.split(",") if p]
    for item in filter(None, args.extra.split(",")):
        name, algo = item.split(":")
        w, a = name[1:].split("A")
        jobs.append((name, QuantSpec(wbits=int(w), abits=int(a), weight_quant=algo)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, quant in jobs:
            preset = name if name in PRESETS else "W4A16"
            cfg = CompileConfig(preset=preset, quant=quant,
                                calib=CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen))
            t0 = time.perf_counter()
            result = compile_model(str(model), Path(tmp) / name, cfg, progress=False)
            secs = time.perf_counter() - t0
            onnx.checker.check_model(str(result.model_path), full_check=True)
            out = logits(result.model_path)
            w = result.report.quantization.weights
            size = sum(f.stat().st_size for f in result.model_path.parent.glob("model.onnx*"))
            rows.append({"config": f"{name} ({quant.weight_quant if quant.wbits < 16 else 'fp'} weights"
                                   f"{', g' + str(quant.group_size) if quant.group_size else ''})",
                         "compile_s": round(secs, 1), "file_mb": round(size / 2**20, 1),
                         "matmulnbits": w.matmulnbits if w else 0,
                         "logits_mse": float(np.mean((out - ref) ** 2)),
                         "top1_agree": float(np.mean(out.argmax(-1) == ref.argmax(-1)))})
    fp_size = sum(f.stat().st_size for f in model.parent.glob("model.onnx*")) / 2**20
    print(f"model {model} ({fp_size:.1f} MB fp32), calibration {args.calib} {args.nsamples} × {args.seqlen}, "
          f"held-out 4 × {args.seqlen}")
    print("| config | compile s | file MB | MatMulNBits | logits MSE vs FP32 | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['compile_s']} | {r['file_mb']} | {r['matmulnbits']} | {r['logits_mse']:.3e} | "
              f"{r['top1_agree']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
