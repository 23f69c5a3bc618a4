"""One command for the GPU machine: the decode benchmark and `--placement` under the CUDA provider.

    python -m rptq_onnx.tools.gpu_check [--model MODEL.onnx] [--preset W4A4KV] [--sizes 8x1024,1x256]

Where ONNX Runtime has a CUDA device, it compiles ``--preset`` eager and with ``--attention fused``
from a random OPT with the opt-125m shapes (or ``--model``), prints which provider ran every GEMM,
Q/DQ and attention node, and times decode steps with the CUDA provider first. Without a CUDA
device it says so and runs the same checks on the CPU provider, so the script itself is tested
everywhere. Note for reading the CUDA placement: ORT's CUDA GroupQueryAttention takes a quantized
cache only with fp16/bf16 inputs, so an fp32 graph's fused attention is expected on the CPU provider.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rptq_onnx.tools.bench_common import add_model_args, open_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--preset", default="W4A4KV")
    parser.add_argument("--sizes", default="8x1024,1x256")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec
    from rptq_onnx.models import train_bpe_tokenizer
    from rptq_onnx.placement import placement
    from rptq_onnx.runtime import _cuda_device_present

    cuda = _cuda_device_present()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    print(f"CUDA device: {'present' if cuda else 'absent — running the checks on the CPU provider'}; "
          f"providers {', '.join(providers)}", flush=True)
    sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    bench = open_model(args)
    with tempfile.TemporaryDirectory(prefix="rptq-gpu-check-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        train_bpe_tokenizer(["a small tokenizer for the check"], vocab_size=300).save_pretrained(tok_dir)
        models = {"FP32 export": bench.path}
        for attention in ("eager", "fused"):
            config = CompileConfig(preset=args.preset, calib=CalibConfig(nsamples=4, seqlen=64), attention=attention,
                                   quant=QuantSpec.for_preset(args.preset, weight_quant="rtn"))
            out = Path(tmp) / attention
            compile_model(str(bench.path), out, config, progress=False)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (out / name).write_bytes((tok_dir / name).read_bytes())
            models[f"{args.preset} {attention}"] = out / "model.onnx"
        print("\n| model | node kind | " + " | ".join(providers) + " | other |")
        print("|---|---|" + "---:|" * (len(providers) + 1))
        for name, path in models.items():
            report = placement(path, providers=providers)
            kinds: dict[str, dict[str, int]] = {}
            for row in report["rows"]:
                by = kinds.setdefault(f"{row['op']} ({row['kind']})", {})
                by[row["provider"]] = by.get(row["provider"], 0) + 1
            for kind, by in sorted(kinds.items()):
                other = sum(v for k, v in by.items() if k not in providers)
                print(f"| {name} | {kind} | " + " | ".join(str(by.get(p, 0)) for p in providers) + f" | {other} |")
        print("\n| model | " + " | ".join(f"decode step ms {b}×{c}" for b, c in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for name, path in models.items():
            print(f"| {name} | " + " | ".join(f"{_step_ms(path, b, c, args.steps, providers, tok_dir):.1f}"
                                              for b, c in sizes) + " |", flush=True)
    return 0


def _step_ms(path: Path, batch: int, context: int, steps: int, providers: list[str], tok_dir: Path) -> float:
    from rptq_onnx.generate import Generator
    from rptq_onnx.tools.bench_kv_cache import _past

    gen = Generator(path, providers=providers, tokenizer_dir=tok_dir)
    past = _past(gen, batch, context - 1, np.random.default_rng(0))
    mask = np.ones((batch, context), np.int64)
    token = np.full((batch, 1), 11, np.int64)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        gen.step(token, mask, past)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
