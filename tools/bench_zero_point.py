"""Effect of the ONNX-representable zero-point rule vs the reference's formula, per R-point.

    python -m rptq_onnx.tools.bench_zero_point [--model MODEL.onnx] [--calib random|FILE] [--bits 4,8]

The reference quantizes a cluster [lo, hi] with scale (hi − lo)/2ⁿ and a signed zero point
−(hi + lo)/(2·scale), which falls off the uint grid when the range excludes 0. rptq-onnx
widens such ranges to include 0 (rptq_onnx/quant.py). From real calibration statistics this
prints how many clusters are affected, how much their grid step grows, and the fake-quant MSE
of both rules on values drawn uniformly from each channel's own calibrated range.
"""

from __future__ import annotations

import argparse

import numpy as np

from rptq_onnx.tools.bench_common import add_calib_args, add_model_args, open_model


def reference_fake_quant(x, lo, hi, bits):
    """The reference (RPTQ4LLM) rule, signed grid, zero point unconstrained."""
    scale = np.maximum((hi - lo) / 2**bits, 1e-8)
    zp = np.round(-(hi + lo) / (2 * scale))
    q = np.clip(np.round(x / scale) + zp, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q - zp) * scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_calib_args(parser)
    parser.add_argument("--bits", default="4,8")
    args = parser.parse_args(argv)

    from rptq_onnx.calibrate import calibrate, calibration_windows
    from rptq_onnx.compile import plan_layer
    from rptq_onnx.config import CalibConfig, CompileConfig
    from rptq_onnx.graph import load_model
    from rptq_onnx.quant import activation_qparams, fake_quant
    from rptq_onnx.quantize import tap_plan
    from rptq_onnx.vocabulary import TAP_POINT

    bench = open_model(args)
    model, layers, vocab, max_pos = bench.path, bench.layers, bench.vocab, bench.max_positions
    graph = load_model(model, load_weights=False)
    cfg = CompileConfig(calib=CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen))
    windows = calibration_windows(cfg.calib, model.parent, vocab, max_pos)
    calib = calibrate(graph, layers, windows, batch_size=4, progress=False, model_dir=model.parent)
    plans = [plan_layer(layer, calib.stats, cfg) for layer in layers]
    rng = np.random.default_rng(0)
    print(f"model {model}, calibration {args.calib} {args.nsamples} × {args.seqlen}, EMA ranges, default clusters")
    print("| point | bits | clusters | excluding 0 | step ×(mean / max) over those | MSE widened ÷ MSE reference |")
    print("|---|---|---|---|---|---|")
    for tap, point in TAP_POINT.items():
        for bits in map(int, args.bits.split(",")):
            n = excl = 0
            ratios, mse_w, mse_r = [], 0.0, 0.0
            for layer, plan in zip(layers, plans):
                mx, mn = calib.stats[(layer.index, tap)].ema.range()
                labels = tap_plan(layer, plan, tap).labels()
                k = int(labels.max()) + 1
                hi = np.array([mx[labels == c].max() for c in range(k)])
                lo = np.array([mn[labels == c].min() for c in range(k)])
                out = (lo > 0) | (hi < 0)
                n, excl = n + k, excl + int(out.sum())
                ratios += list((np.maximum(hi, 0) - np.minimum(lo, 0))[out] / (hi - lo)[out])
                x = rng.uniform(mn, mx, size=(256, len(mx)))
                _, deq = fake_quant(x, activation_qparams(mx, mn, labels, bits))
                mse_w += float(np.mean((deq - x) ** 2))
                mse_r += float(np.mean((reference_fake_quant(x, lo[labels], hi[labels], bits) - x) ** 2))
            step = f"{np.mean(ratios):.2f} / {np.max(ratios):.2f}" if ratios else "–"
            print(f"| {tap} ({point}) | {bits} | {n} | {excl} ({100 * excl / n:.1f} %) | {step} | {mse_w / mse_r:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
