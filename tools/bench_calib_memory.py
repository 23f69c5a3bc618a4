"""Peak memory of calibration vs plain ONNX Runtime inference on the same token batches.

    python -m rptq_onnx.tools.bench_calib_memory [--model MODEL.onnx] [--nsamples 16] [--seqlen 512]

Without --model it builds a random OPT with the opt-125m shapes and exports it (cached in
--workdir). Each mode runs in its own process; the figure is that process's peak RSS
(``ru_maxrss``), imports included. Calibration taps reduce to [batch, channels] inside the
graph and the LM head is cut, so calibrating should cost about what inference does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rptq_onnx.tools.bench_common import add_model_args, open_model

CHILD = r"""
import json, resource, sys
import numpy as np
mode, model, nsamples, seqlen, batch, vocab = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
windows = np.random.default_rng(0).integers(0, vocab, (nsamples, seqlen))
if mode == "inference":
    from rptq_onnx.runtime import feeds_for
    from rptq_onnx.anatomy import find_layers
    from rptq_onnx.graph import load_model
    from rptq_onnx.runtime import make_session
    layers = find_layers(load_model(model, load_weights=False))
    sess = make_session(model)
    for s in range(0, nsamples, batch):
        out = sess.run(None, feeds_for(sess, windows[s:s + batch], layers))
        del out
else:
    from pathlib import Path
    from rptq_onnx.anatomy import find_layers
    from rptq_onnx.calibrate import calibrate
    from rptq_onnx.graph import load_model
    graph = load_model(model, load_weights=False)
    layers = find_layers(graph)
    calibrate(graph, layers, windows, batch_size=batch, progress=False, model_dir=Path(model).parent)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(mode: str, model: Path, nsamples: int, seqlen: int, batch: int, vocab: int) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), str(nsamples), str(seqlen), str(batch),
                           str(vocab)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    bench = open_model(args)
    model, vocab = bench.path, bench.vocab
    rows = []
    for mode in ("inference", "calibration"):
        rows.append((mode, measure(mode, model, args.nsamples, args.seqlen, args.batch_size, vocab)))
    base = rows[0][1]
    print(f"model {model}  ({args.nsamples} × {args.seqlen} tokens, batch {args.batch_size})")
    print(f"| {'run':<33} | {'peak RSS (MB)':>13} | {'÷ inference':>11} |")
    print(f"|{'-' * 35}|{'-' * 15}|{'-' * 13}|")
    labels = {"inference": "plain ORT inference (all outputs)", "calibration": "calibration (taps, no LM head)"}
    for mode, rss in rows:
        print(f"| {labels[mode]:<33} | {rss:>13.0f} | {rss / base:>11.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
