"""How to run 4-bit codes whose blocks have a float minimum (a GGUF Q4_1) at MatMulNBits speed.

    python -m rptq_onnx.tools.bench_source_grid [--n 1536] [--k 576] [--tokens 1,64] [--threads 1]

One linear [K → N] with blocks of 32, on ORT's CPU provider, three ways of computing x · Wᵀ for
W = d·q + m per block:

- ``float zero points``: MatMulNBits with zero_points of the scales' type (zp = −m/d): exact, one node;
- ``offset term`` (what rptq-onnx emits, passes/quantize_weights.py): MatMulNBits with uint4 zero
  points, plus x's block sums times the offsets (two small MatMuls and an Add): exact;
- ``integer zero points``: MatMulNBits alone with uint4 zero points — the speed reference; it cannot
  carry Q4_1's float minimum exactly.

Prints ms per call (median of rounds) at accuracy_level 0 and 4 and each token count, and the
largest error of each against x · Wᵀ in float64.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

BLOCK = 32


def _model(n: int, k: int, form: str, acc: int, codes, scale, offset):
    from onnx import TensorProto, helper, numpy_helper

    from rptq_onnx.quant import pack_uint4

    blocks = k // BLOCK
    inits = [numpy_helper.from_array(pack_uint4(codes.reshape(n, blocks, BLOCK)), "B"),
             numpy_helper.from_array(scale.reshape(-1), "s")]
    if form == "float zero points":
        inits.append(numpy_helper.from_array((-offset / scale).astype(np.float32).reshape(-1), "z"))
    else:
        inits.append(numpy_helper.from_array(pack_uint4(np.zeros((n, blocks), np.uint8)), "z"))
    out = "y" if form != "offset term" else "mm"
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "s", "z"], [out], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=BLOCK, accuracy_level=acc)]
    if form == "offset term":
        inits += [numpy_helper.from_array(np.repeat(np.eye(blocks, dtype=np.float32), BLOCK, axis=0), "ones"),
                  numpy_helper.from_array(np.ascontiguousarray(offset.T), "offset")]
        nodes += [helper.make_node("MatMul", ["x", "ones"], ["sums"]), helper.make_node("MatMul", ["sums", "offset"], ["t"]),
                  helper.make_node("Add", ["mm", "t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    n, k = args.n, args.k
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scale = rng.uniform(1e-3, 1e-2, (n, k // BLOCK)).astype(np.float32)
    offset = rng.uniform(-0.1, 0.0, (n, k // BLOCK)).astype(np.float32)
    w = codes * np.repeat(scale, BLOCK, axis=1).astype(np.float64) + np.repeat(offset, BLOCK, axis=1)
    print(f"one linear {k} → {n}, blocks of {BLOCK}, {args.threads} thread(s); ms per call (median of {args.rounds})\n")
    print(f"| form | accuracy_level | {' | '.join(f'{t} token(s)' for t in args.tokens.split(','))} | max error |")
    print("|---|---:|" + "---:|" * (len(args.tokens.split(",")) + 1))
    for form in ("float zero points", "offset term", "integer zero points"):
        for acc in (0, 4):
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(_model(n, k, form, acc, codes, scale, offset).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
            cells, err = [], 0.0
            for t in map(int, args.tokens.split(",")):
                x = rng.normal(size=(t, k)).astype(np.float32)
                y = sess.run(None, {"x": x})[0]
                if form != "integer zero points":
                    err = max(err, float(np.abs(y - x @ w.T).max() / np.abs(x @ w.T).max()))
                calls = max(5, 200 // t)
                times = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        sess.run(None, {"x": x})
                    times.append((time.perf_counter() - t0) / calls * 1e3)
                cells.append(f"{statistics.median(times):.3f}")
            shown = "not exact" if form == "integer zero points" else f"{err:.1e}"
            print(f"| {form} | {acc} | {' | '.join(cells)} | {shown} |")


if __name__ == "__main__":
    main()
