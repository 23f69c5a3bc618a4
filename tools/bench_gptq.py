"""GPTQ time per linear, and what it buys over RTN, on random correlated inputs.

    python -m rptq_onnx.tools.bench_gptq [--shapes 768x3072,2048x8192] [--bits 4] [--group-size 0]

Each shape is out × in (the linear's output and input sizes; 2048 × 8192 is OPT-1.3b's fc2). The
Hessian 2XᵀX/n comes from random input rows (twice as many as inputs, unless ``--samples``) that
share 64 latent factors and have a few outlier channels, as real activations do; error = mean
squared output error on fresh inputs of the same distribution.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768x3072,2048x8192")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=0, help="0: per output channel")
    parser.add_argument("--samples", type=int, default=0, help="calibration rows (default: 2 × in)")
    args = parser.parse_args(argv)

    from rptq_onnx.quant import quantize_gptq, quantize_rtn

    group = args.group_size or None
    print(f"\nGPTQ, {args.bits}-bit, {'per channel' if group is None else f'groups of {group}'}\n")
    print("| linear (out × in) | GPTQ s | output MSE GPTQ | output MSE RTN |")
    print("|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        out, cols = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        outliers = np.ones(cols, np.float32)
        outliers[rng.choice(cols, max(1, cols // 128), replace=False)] = 20.0

        factors = rng.normal(size=(64, cols)).astype(np.float32)

        def inputs(n):
            shared = rng.normal(size=(n, 64)).astype(np.float32) @ factors
            return (rng.normal(size=(n, cols)).astype(np.float32) + shared) * outliers

        x = inputs(args.samples or 2 * cols)
        hessian = 2.0 * (x.T.astype(np.float64) @ x) / len(x)
        w = rng.normal(size=(out, cols)).astype(np.float32)
        t0 = time.perf_counter()
        gptq = quantize_gptq(w, hessian, args.bits, group)
        seconds = time.perf_counter() - t0
        test = inputs(1024)

        def mse(q):
            return float(np.mean((test @ (q.dequantize() - w).T) ** 2))

        print(f"| {out} × {cols} | {seconds:.1f} | {mse(gptq):.4g} | {mse(quantize_rtn(w, args.bits, group)):.4g} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
