"""What one 4-bit linear costs in ONNX Runtime's MatMulNBits, by how its zero points are carried.

    python -m rptq_onnx.tools.bench_matmulnbits [--k 576] [--block 32] [--layers 30] [--rounds 3] [--provider cpu|cuda]
        [--dtype float32|float16]

A chain of ``--layers`` square linears [k → k] (each followed by a Tanh, so values stay bounded) is timed on one
decode token (batch 1, one position, one thread); the table gives microseconds per linear, the
median of 200 runs, the fastest of ``--rounds`` rounds, at accuracy levels 0 (float GEMM) and 4
(int8 inputs). ``--provider cuda`` times the same graphs on ONNX Runtime's CUDA provider (where
accuracy_level selects nothing, so both columns should agree); ``--dtype float16`` builds the graphs in
half precision, as a GPU deployment would. Variants:

- ``no zero point``: the kernel's default zero point 8 (symmetric codes, as GenAI's builder writes);
- ``uint4 zero points``: an integer zero point per block (an asymmetric grid);
- ``float zero points``: a float zero point per block, the only in-kernel form of a Q4_1 grid
  (``m + d·q``) whose minimum is not a whole number of steps;
- ``offset term``: no zero point plus what rptq-onnx adds for such a kept Q4_1 grid
  (passes/quantize_weights.py): the input's block sums (a MatMul), their product with the float
  offsets (a MatMul) and an Add.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

VARIANTS = ("no zero point", "uint4 zero points", "float zero points", "offset term")


def chain(variant: str, level: int, k: int, n: int, block: int, layers: int, seed: int = 0, provider: str = "cpu",
          dtype: str = "float32"):
    """An ONNX Runtime session over ``layers`` linears [k → n] (n == k) in the form ``variant``."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    ftype = np.dtype(dtype)
    blocks = k // block
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        name = f"l{i}"
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), f"{name}.codes"),
                  numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(ftype), f"{name}.scales")]
        inputs = [x, f"{name}.codes", f"{name}.scales"]
        if variant == "uint4 zero points":
            packed = rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8)
            inits.append(numpy_helper.from_array(packed, f"{name}.zp"))
            inputs.append(f"{name}.zp")
        elif variant == "float zero points":
            inits.append(numpy_helper.from_array((rng.random(n * blocks) * 15).astype(ftype), f"{name}.zp"))
            inputs.append(f"{name}.zp")
        y = f"{name}.y"
        nodes.append(helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block, accuracy_level=level, name=name))
        if variant == "offset term":
            sums = np.kron(np.eye(blocks), np.ones((block, 1))).astype(ftype)  # [k, k/block]
            inits += [numpy_helper.from_array(sums, f"{name}.sums"),
                      numpy_helper.from_array(rng.random((blocks, n)).astype(ftype), f"{name}.offset")]
            nodes += [helper.make_node("MatMul", [x, f"{name}.sums"], [f"{name}.s"], name=f"{name}.block_sums"),
                      helper.make_node("MatMul", [f"{name}.s", f"{name}.offset"], [f"{name}.o"], name=f"{name}.offset"),
                      helper.make_node("Add", [y, f"{name}.o"], [f"{name}.yo"], name=f"{name}.add")]
            y = f"{name}.yo"
        nodes.append(helper.make_node("Tanh", [y], [f"{name}.t"], name=f"{name}.tanh"))
        x = f"{name}.t"
    elem = helper.np_dtype_to_tensor_dtype(ftype)
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, [1, 1, k])],
                              [helper.make_tensor_value_info(x, elem, [1, 1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}[provider]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise SystemExit(f"error: {providers[0]} is not available in this onnxruntime; run with --provider cpu")
    return session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=576, help="input features (SmolLM2's hidden size)")
    parser.add_argument("--block", type=int, default=32, help="block size along the input (Q4_1's)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)

    sessions = {(v, level): chain(v, level, args.k, args.k, args.block, args.layers, provider=args.provider,
                                dtype=args.dtype)
                for v in VARIANTS for level in (0, 4)}
    x = np.random.default_rng(1).random((1, 1, args.k)).astype(args.dtype)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):  # rounds over every variant in turn, so a busy moment hits all alike
        for key, session in sessions.items():
            for _ in range(10):
                session.run(None, {"x": x})
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            best[key] = min(best.get(key, np.inf), statistics.median(times) / args.layers * 1e6)
    print(f"MatMulNBits {args.k} × {args.k} ({args.dtype}), 4-bit blocks of {args.block}, one decode token, "
          f"{'CUDA provider' if args.provider == 'cuda' else 'CPU provider, one thread'} (µs per linear, median of {args.runs}, fastest of {args.rounds} rounds)\n")
    print("| variant | accuracy_level 0 | accuracy_level 4 |\n|---|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {best[(v, 0)]:.1f} | {best[(v, 4)]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
