"""KV-cache memory and decode speed per preset, measured from the OrtValues ONNX Runtime holds.

    python -m rptq_onnx.tools.bench_kv_cache [--model MODEL.onnx] [--presets W4A4KV,W4A3KV,W3A3KV,W8A8]
        [--attention eager,fused] [--sizes 8x1024,1x256] [--steps 5] [--threads N] [--json OUT.json]

Without --model it uses a random OPT with the opt-125m shapes (tools/bench_common.py). For the
FP32 export and each preset compiled with its low-bit cache, and again with ``--float-cache``:

1. generation: a 32-token prompt and 32 greedy decode steps (batch 1); the bytes per token per
   layer (K + V) and bits per element come from the final ``present`` OrtValues
   (``tensor_size_in_bytes``), not from the config;
2. a batch × context cache (the first of ``--sizes``, default 8 × 1024): a past of context − 1
   tokens is built as OrtValues and one decode step returns the full present, whose bytes are
   summed over all layers;
3. decode step time at each batch × context of ``--sizes``: the median of ``--steps`` steps on
   ORT CPU, every model's steps interleaved round by round, so that load on a shared machine
   falls on all of them alike (compare ratios within one run).

The FP16 row is an *equivalent* (FP32 bytes / 2): ORT CPU runs these graphs in float32.
Speed ratios compare each low-bit cache with the same preset's float cache (same Q/DQ, only
the cache storage differs) and with the FP32 export. ``--attention fused`` adds, for each preset
that allows it, the graph whose attention is one GroupQueryAttention over the kernel's int4/int8
cache (``compile --attention fused``), with the same two ratios (÷ the eager float cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rptq_onnx.tools.bench_common import add_model_args, open_model


def _past(gen, batch: int, tokens: int, rng: np.random.Generator) -> dict:
    """A synthetic past of ``tokens`` tokens: random floats, or random codes in the cache's grid."""
    import onnxruntime as ort

    from rptq_onnx.generate import codes_to_ortvalue

    past = {}
    for inp in gen.past_inputs:
        if inp.type == "tensor(float)":
            shape = (batch, inp.shape[1], tokens, inp.shape[3])
            past[inp.name] = ort.OrtValue.ortvalue_from_numpy(rng.normal(0, 1, shape).astype(np.float32))
        elif len(inp.shape) == 4:  # fused attention: int8 [B, kv, T, D] or packed 4-bit uint8 [B, kv, T, D/2]
            dtype = np.int8 if inp.type == "tensor(int8)" else np.uint8
            lo, hi = (-128, 128) if dtype == np.int8 else (0, 256)
            codes = rng.integers(lo, hi, (batch, inp.shape[1], tokens, inp.shape[3])).astype(dtype)
            past[inp.name] = ort.OrtValue.ortvalue_from_numpy(codes)
        else:
            top = 15 if inp.type == "tensor(uint4)" else 255
            past[inp.name] = codes_to_ortvalue(rng.integers(0, top + 1, (batch, inp.shape[1], tokens)), inp.type)
    return past


def measure_cache(gen) -> dict:
    """Cache bytes and bits from a real generation: a 32-token prompt and 32 greedy steps (batch 1)."""
    out = gen.generate_ids([list(range(10, 42))], max_new_tokens=32, stop_at_eos=False)
    c = out.cache
    # K + V channels of one layer: float past [B, H, T, D], low-bit past [B, H·D, T], fused 4-bit [B, H, T, D/2]
    packed = 2 if gen.cache_type == "tensor(uint8)" and len(gen.past_inputs[0].shape) == 4 else 1
    layer_channels = sum(i.shape[1] * i.shape[3] * packed if len(i.shape) == 4 else i.shape[1]
                         for i in gen.past_inputs[:2])
    elements = c.batch * c.tokens * c.layers * layer_channels
    return {"cache_type": c.element_type.removeprefix("tensor(").rstrip(")"),
            "bytes_per_token_per_layer": c.bytes_per_token_per_layer,
            "bits_per_element": 8 * c.bytes_total / elements, "generated": len(out.new_tokens[0]), "step_ms": {}}


def time_steps(gens: dict, rows: dict, sizes: list[tuple[int, int]], steps: int) -> None:
    """Decode step times at each batch × context, the models interleaved step by step (A B C A B C …) so
    that the machine's load drifts over all of them alike; also the first size's cache bytes."""
    from rptq_onnx.generate import footprint

    for n, (batch, context) in enumerate(sizes):
        feeds = {name: (np.full((batch, 1), 11, np.int64), np.ones((batch, context), np.int64),
                        _past(gen, batch, context - 1, np.random.default_rng(0))) for name, gen in gens.items()}
        times: dict[str, list[float]] = {name: [] for name in gens}
        for i in range(steps + 1):  # the first round warms up
            for name, gen in gens.items():
                t0 = time.perf_counter()
                _, nxt = gen.step(*feeds[name])
                if i:
                    times[name].append(time.perf_counter() - t0)
                elif n == 0:
                    rows[name]["batch_context_bytes"] = footprint(nxt, gen.cache_type).bytes_total
                del nxt
        for name in gens:
            rows[name]["step_ms"][f"{batch}x{context}"] = 1000 * float(np.median(times[name]))
        del feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--presets", default="W4A4KV,W4A3KV,W3A3KV,W8A8")
    parser.add_argument("--sizes", default="8x1024,1x256",
                        help="batch×context settings timed; the first also sizes the memory column")
    parser.add_argument("--attention", default="eager,fused",
                        help="eager (the exported attention, Q/DQ around a float concat) and/or fused (one "
                             "GroupQueryAttention over the kernel's low-bit cache)")
    parser.add_argument("--steps", type=int, default=7, help="decode steps timed (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec
    from rptq_onnx.errors import RptqError
    from rptq_onnx.models import train_bpe_tokenizer

    sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    bench = open_model(args)
    with tempfile.TemporaryDirectory(prefix="rptq-bench-kv-") as tmp:
        # generate needs a tokenizer; the benchmark feeds token ids, so any small one will do
        tok_dir = Path(tmp) / "tokenizer"
        train_bpe_tokenizer(["a small tokenizer for the benchmark"], vocab_size=300).save_pretrained(tok_dir)
        paths = {"FP32": bench.path}
        for preset in args.presets.split(","):
            for float_cache in (False, True):
                name = preset + (" float cache" if float_cache else "")
                # the cache does not depend on how weights are rounded: RTN keeps the benchmark quick
                config = CompileConfig(preset=preset, calib=CalibConfig(nsamples=4, seqlen=64),
                                       quant=QuantSpec.for_preset(preset, weight_quant="rtn", float_cache=float_cache))
                out = Path(tmp) / name.replace(" ", "-")
                compile_model(str(bench.path), out, config, progress=False)
                paths[name] = out / "model.onnx"
            if "fused" in args.attention.split(","):
                name = preset + " fused"
                try:
                    config = CompileConfig(preset=preset, calib=CalibConfig(nsamples=4, seqlen=64), attention="fused",
                                           quant=QuantSpec.for_preset(preset, weight_quant="rtn"))
                except RptqError as exc:  # e.g. W8A8 quantizes P
                    print(f"{name}: skipped ({exc})", flush=True)
                    continue
                out = Path(tmp) / name.replace(" ", "-")
                compile_model(str(bench.path), out, config, progress=False)
                paths[name] = out / "model.onnx"
        from rptq_onnx.generate import Generator

        gens = {name: Generator(path, threads=args.threads, tokenizer_dir=tok_dir) for name, path in paths.items()}
        rows = {name: measure_cache(gen) for name, gen in gens.items()}
        time_steps(gens, rows, sizes, args.steps)
        for name, row in rows.items():
            print(f"{name}: {row}", flush=True)

    layers = len(bench.layers)
    fp32 = rows["FP32"]
    (b0, c0), keys = sizes[0], [f"{b}x{c}" for b, c in sizes]
    print(f"\nKV cache on {bench.path} ({layers} layers, hidden {bench.layers[0].hidden_size}); ORT CPU decode step "
          f"time at batch×context {', '.join(keys)} (median of {args.steps}); ratios: ÷ the same preset's float cache "
          "/ ÷ the FP32 export\n")
    print("| cache | stored as | bits/elem | bytes/token/layer (K+V) | vs FP16 | vs FP32 | "
          f"{b0}×{c0} cache | " + " | ".join(f"step ms {k} (÷ float cache, ÷ FP32)" for k in keys) + " |")
    print("|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(keys))
    fp16_bytes = fp32["bytes_per_token_per_layer"] / 2

    def steps(r, ref=None):
        return " | ".join(f"{r['step_ms'][k]:.1f}" + (f" ({r['step_ms'][k] / ref['step_ms'][k]:.2f}, "
                                                          f"{r['step_ms'][k] / fp32['step_ms'][k]:.2f})" if ref else "")
                          for k in keys)

    print(f"| FP32 export | float32 | 32 | {fp32['bytes_per_token_per_layer']:,.0f} | 0.5× | 1.0× | "
          f"{_mb(fp32['batch_context_bytes'])} | {steps(fp32)} |")
    print(f"| FP16 (equivalent, not run) | float16 | 16 | {fp16_bytes:,.0f} | 1.0× | 2.0× | "
          f"{_mb(fp32['batch_context_bytes'] / 2)} |" + " – |" * len(keys))
    for preset in args.presets.split(","):
        r, f = rows[preset], rows[preset + " float cache"]
        print(f"| {preset} | {r['cache_type']} | {r['bits_per_element']:g} | {r['bytes_per_token_per_layer']:,.0f} | "
              f"{fp16_bytes / r['bytes_per_token_per_layer']:.2f}× | "
              f"{fp32['bytes_per_token_per_layer'] / r['bytes_per_token_per_layer']:.2f}× | "
              f"{_mb(r['batch_context_bytes'])} | {steps(r, f)} |")
        print(f"| {preset}, --float-cache | {f['cache_type']} | {f['bits_per_element']:g} | "
              f"{f['bytes_per_token_per_layer']:,.0f} | – | – | {_mb(f['batch_context_bytes'])} | {steps(f, f)} |")
        u = rows.get(preset + " fused")
        if u is not None:
            stored = "int8" if u["cache_type"] == "int8" else "4-bit in uint8" if u["cache_type"] == "uint8" else u["cache_type"]
            print(f"| {preset}, --attention fused | {stored} | {u['bits_per_element']:g} | "
                  f"{u['bytes_per_token_per_layer']:,.0f} | {fp16_bytes / u['bytes_per_token_per_layer']:.2f}× | "
                  f"{fp32['bytes_per_token_per_layer'] / u['bytes_per_token_per_layer']:.2f}× | "
                  f"{_mb(u['batch_context_bytes'])} | {steps(u, f)} |")
    print("\nvs FP16 / vs FP32: how many times smaller the cache is. Q/DQ of activations is simulated on ORT CPU "
          "(float math); the cache storage is real: the OrtValues hold the codes.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sizes": keys, "rows": rows}, indent=2) + "\n")
    return 0


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
