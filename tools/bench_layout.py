"""Runtime cost of the two reorder layouts: zero-copy (no Gather) vs contiguous (Gather before R1/R4 LNs).

    python -m rptq_onnx.tools.bench_layout [--model MODEL.onnx] [--batch 1] [--seqlen 128] [--repeats 20]
                                           [--tokens random|sotu-test|FILE]

Compiles ``--preset reorder`` in both layouts (random calibration tokens: this measures
speed and equality, not quality), then times ORT CPU prefill (median of --repeats runs) on
``--tokens`` (uniformly random ids by default, or windows of a text) and reports the largest
logits difference to the original graph.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rptq_onnx.tools.bench_common import add_model_args, open_model
from rptq_onnx.vocabulary import REORDER_PREFIX


def _time(session, feed, repeats: int) -> tuple[float, np.ndarray]:
    out = session.run(None, feed)[0]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", default="random",
                        help="random (default: uniform ids), or a text to cut windows from: sotu-test or a file")
    parser.add_argument("--fp64", action="store_true",
                        help="also compare every graph with the torch model in float64 (the fp32 rounding floor)")
    args = parser.parse_args(argv)

    from rptq_onnx.compile import compile_model
    from rptq_onnx.runtime import feeds_for
    from rptq_onnx.config import CalibConfig, CompileConfig
    from rptq_onnx.graph import load_model
    from rptq_onnx.runtime import make_session

    bench = open_model(args)
    model, layers, vocab = bench.path, bench.layers, bench.vocab
    if args.tokens == "random":
        ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seqlen))
    else:
        from rptq_onnx.calibrate import calibration_windows

        text = CalibConfig(source=args.tokens, nsamples=args.batch, seqlen=args.seqlen, seed=1)
        ids = calibration_windows(text, Path(model).parent, vocab, None)
    exact = _torch_fp64_logits(Path(model).parent, ids) if args.fp64 else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"original": model}
        for layout in ("zero-copy", "contiguous"):
            cfg = CompileConfig(layout=layout, calib=CalibConfig(nsamples=2, seqlen=64))
            paths[layout] = compile_model(str(model), Path(tmp) / layout, cfg, progress=False).model_path
        ref = None
        for name, path in paths.items():
            sess = make_session(path, threads=2)
            ms, logits = _time(sess, feeds_for(sess, ids, layers), args.repeats)
            gathers = sum(n.op_type == "Gather" and n.name.startswith(REORDER_PREFIX)
                          for n in load_model(path, load_weights=False).graph.node)
            ref = logits if ref is None else ref
            diff = float(np.abs(logits - ref).max() / np.abs(ref).max())
            floor = float(np.abs(logits - exact).max() / np.abs(exact).max()) if exact is not None else None
            rows.append((name, gathers, ms, diff, floor))
    print(f"model {model}  (prefill {args.batch} × {args.seqlen} {args.tokens} tokens, ORT CPU, median of {args.repeats})")
    extra = f" {'vs torch fp64':>13} |" if exact is not None else ""
    print(f"| {'graph':<11} | {'reorder Gathers':>15} | {'prefill ms':>10} | {'÷ original':>10} | "
          f"{'max |Δlogits| / max|logits|':>27} |{extra}")
    print(f"|{'-' * 13}|{'-' * 17}|{'-' * 12}|{'-' * 12}|{'-' * 29}|" + ("-" * 15 + "|" if extra else ""))
    for name, gathers, ms, diff, floor in rows:
        tail = f" {floor:>13.2e} |" if floor is not None else ""
        print(f"| {name:<11} | {gathers:>15} | {ms:>10.2f} | {ms / rows[0][2]:>10.3f} | {diff:>27.2e} |{tail}")
    return 0


def _torch_fp64_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of the model the export came from (export.json's source), run by torch in float64."""
    import json

    import torch

    from rptq_onnx.runtime import position_ids
    from rptq_onnx.export import _load_torch_model, resolve_model_source

    record = json.loads((model_dir / "export.json").read_text())
    hf = _load_torch_model(resolve_model_source(record["source"])).to(torch.float64)
    mask = np.ones_like(ids)
    kwargs = {"position_ids": torch.tensor(position_ids(mask, ids.shape[1]))} if record["family"] == "llama" else {}
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()


if __name__ == "__main__":
    raise SystemExit(main())
