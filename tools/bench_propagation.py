"""Float against quantized propagation: what the next layer is calibrated on, measured per preset.

    python -m rptq_onnx.tools.bench_propagation [--model smollm2] [--presets W16A8,W16A4,W16A4KV,W4A4KV]
        [--max-tokens 32768] [--out runs/bench-propagation]

A layer-wise compile calibrates each layer on the stream leaving the layer before it: the float
stream (``--propagate float``, the default: the same clusters and codes as a whole-graph compile)
or the stream of the layer as compiled (``--propagate quantized``, as the RPTQ reference does).
Each cell is ``rptq-onnx compile MODEL --preset P [--wbits 16] --propagate X`` with every other flag
at its default (calibration on ``--calib``, sotu-train: 32 × 512), then ``rptq-onnx eval --max-tokens N`` on
sotu-test; ``W16…`` presets are ``--preset W…`` with ``--wbits 16``. The model is exported once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PROPAGATIONS = ("float", "quantized")


def cli(*args: str) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "rptq_onnx", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"rptq-onnx {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def preset_flags(preset: str) -> list[str]:
    """``--preset`` flags for a named preset, or W16A… as that preset's W4 form with ``--wbits 16``."""
    m = re.fullmatch(r"W16(A\d+(?:KV)?)", preset)
    return ["--preset", f"W4{m.group(1)}", "--wbits", "16"] if m else ["--preset", preset]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--presets", default="W16A8,W16A4,W16A4KV,W4A4KV")
    parser.add_argument("--calib", default="sotu-train")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-propagation"))
    args = parser.parse_args(argv)
    fp = args.out / "fp"
    if not (fp / "model.onnx").is_file():
        cli("export", args.model, "-o", str(fp))
    print(f"{args.model}: perplexity on the first {args.max_tokens:,} tokens of sotu-test, calibration on sotu-train")
    fp_ppl = args.out / f"fp-perplexity-{args.max_tokens}.txt"  # kept between runs, as the export is
    if not fp_ppl.is_file():
        fp_ppl.write_text(f"{_ppl(fp, args.max_tokens):.3f}\n")
    print(f"FP32: {fp_ppl.read_text().strip()}", flush=True)
    print("| preset | float | quantized | quantized ÷ float | compile s (float / quantized) | clustering, % of compile |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        ppl, secs, share = {}, {}, {}
        for how in PROPAGATIONS:
            out = args.out / f"{preset}-{how}"
            t0 = time.perf_counter()
            cli("compile", str(fp), "-o", str(out), *preset_flags(preset), "--calib", args.calib, "--propagate", how,
                "-q")
            secs[how] = time.perf_counter() - t0
            timings = json.loads((out / "report.json").read_text())["timings_s"]
            share[how] = 100 * timings.get("cluster", 0.0) / timings["total"]
            ppl[how] = _ppl(out, args.max_tokens)
        print(f"| {preset} | {ppl['float']:.3f} | {ppl['quantized']:.3f} | {ppl['quantized'] / ppl['float']:.4f} | "
              f"{secs['float']:.0f} / {secs['quantized']:.0f} | {share['float']:.1f} / {share['quantized']:.1f} |", flush=True)
    return 0


def _ppl(model_dir: Path, max_tokens: int) -> float:
    out = cli("eval", str(model_dir), "--max-tokens", str(max_tokens))
    return float(re.search(r"perplexity ([0-9.]+)", out).group(1))


if __name__ == "__main__":
    raise SystemExit(main())
