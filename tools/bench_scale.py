"""Compile at scale: wall time and peak memory of `rptq-onnx compile`, whole-graph against layer-wise.

    python -m rptq_onnx.tools.bench_scale MODEL_DIR [--modes whole,layer-wise] [--preset W4A4KV]
        [--weight-quant gptq] [--nsamples 32] [--seqlen 512] [--out runs/bench-scale]

MODEL_DIR holds an exported model.onnx with external data, e.g. a random OPT with the opt-1.3b shapes
written by ``python -m rptq_onnx.tools.make_random_opt DIR --onnx --shapes opt-1.3b``. Calibration is
on random token ids (the figures are about memory and time, not quality). Each mode compiles in its
own process; its peak RSS is that process's (``wait4``), ÷ the model's fp32 weight bytes (the size
of its initializers). Stage times come from the compile's report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = {"whole": [], "layer-wise": ["--layer-wise"], "quantized": ["--propagate", "quantized"]}


def weight_bytes(model_dir: Path) -> int:
    import onnx

    from rptq_onnx.graph import load_model

    model = load_model(model_dir / "model.onnx", load_weights=False)
    return sum(int(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize) * int(max(1, _count(t.dims)))
               for t in model.graph.initializer)


def _count(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def run_mode(model_dir: Path, out: Path, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "rptq_onnx", "compile", str(model_dir), "-o", str(out), "--preset", args.preset,
           "--calib", "random", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--weight-quant", args.weight_quant, "--quiet", *MODES[mode]]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        return {"mode": mode, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {status}"}
    report = json.loads((out / "report.json").read_text())
    return {"mode": mode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "timings": report["timings_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--modes", default="whole,layer-wise")
    parser.add_argument("--preset", default="W4A4KV")
    parser.add_argument("--weight-quant", default="gptq", choices=("gptq", "rtn"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: {unknown[0]} is unknown; choose from {', '.join(MODES)}")
    fp32 = weight_bytes(args.model_dir)
    print(f"{args.model_dir}: {fp32 / 1e9:.2f} GB of weights; {args.preset}, {args.weight_quant}, "
          f"{args.nsamples} × {args.seqlen} random tokens")
    print("| mode | wall | peak RSS (GiB) | ÷ weights | calibrate | cluster | fold | quantize | other |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        row = run_mode(args.model_dir, args.out / mode, mode, args)
        if "error" in row:
            print(f"| {mode} | failed: {row['error']} |")
            continue
        t = row["timings"]
        phase = {p: t.get(p, 0.0) for p in ("calibrate", "cluster", "fold", "quantize")}
        other = t["total"] - sum(phase.values()) - t.get("propagate", 0.0)
        print(f"| {mode} | {row['wall_s'] / 60:.1f} min | {row['peak_rss_mb'] / 1024:.2f} | "
              f"{row['peak_rss_mb'] * 2**20 / fp32:.2f} | " + " | ".join(f"{phase[p]:.0f} s" for p in phase) +
              f" | {other:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
