"""What each kind of activation Q/DQ point costs a compiled model: its perplexity with that kind's Q/DQ
removed in every layer (the rest kept), next to the model as compiled.

    python -m rptq_onnx.tools.bench_point_cost COMPILED_DIR [--text sotu-test] [--max-tokens 16384]
        [--seqlen 512] [--groups P,out_in,fc2_in,attn_ln+ffn_ln,q+k+v]

Groups are tap names (``inspect --error`` lists them per layer) joined by ``+``. The K/V cache's own
quantization (``rptq.kv.*``) stays in every variant. Activation Q/DQ is simulated on ORT's CPU
provider, so removing it is exactly the float value at that point.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

DEFAULT_GROUPS = "P,out_in,fc2_in,attn_ln+ffn_ln,q+k+v"


def _variant(folder: Path, model, out: Path) -> Path:
    """``model`` saved as out/model.onnx beside hard links to every other file of the compiled ``folder`` (ONNX
    Runtime refuses external data that a symbolic link places outside the model's directory)."""
    import onnx

    out.mkdir()
    for f in folder.iterdir():
        if f.name != "model.onnx" and f.is_file():
            os.link(f, out / f.name)
    onnx.save(model, str(out / "model.onnx"))
    return out / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a compiled model directory (or its model.onnx)")
    parser.add_argument("--text", default="sotu-test")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--groups", default=DEFAULT_GROUPS)
    args = parser.parse_args(argv)

    from rptq_onnx.evaluate import load_text, perplexity
    from rptq_onnx.graph import load_model
    from rptq_onnx.point_error import bypassed, qdq_points

    path = args.model / "model.onnx" if args.model.is_dir() else args.model
    skeleton = load_model(path, load_weights=False)
    points = qdq_points(skeleton)
    if not points:
        raise SystemExit(f"{path}: no activation Q/DQ points (a weight-only or reorder-only model)")
    text = load_text(args.text)

    def ppl(p: Path) -> float:
        return perplexity(p, text, seqlen=args.seqlen, max_tokens=args.max_tokens, progress=False).perplexity

    base = ppl(path)
    rows = [("(as compiled)", base)]
    print(f"{'(as compiled)':16s} {base:.3f}", flush=True)
    with tempfile.TemporaryDirectory(prefix=".rptq-point-cost-", dir=path.parent.parent) as tmp:  # same file system
        for group in args.groups.split(","):
            taps = set(group.split("+"))
            chosen = [p for p in points if p[1] in taps]
            if not chosen:
                rows.append((group, None))
                continue
            rows.append((group, ppl(_variant(path.parent, bypassed(skeleton, chosen), Path(tmp) / group))))
            print(f"{group:16s} {rows[-1][1]:.3f}", flush=True)
    print(f"\n{path}: perplexity on the first {args.max_tokens} tokens of {args.text}, one kind of point left "
          "in float at a time\n\n| float at | perplexity | change |\n|---|---|---|")
    for group, value in rows:
        cell = "no such point" if value is None else f"{value:.2f} | {100 * (value / base - 1):+.1f} %"
        print(f"| {group} | {cell} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
