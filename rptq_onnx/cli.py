"""`rptq-onnx` command line. Each subcommand's flags mirror the Python API one to one."""

from __future__ import annotations

import argparse
import json
import sys

from rptq_onnx.errors import RptqError


def _cmd_export(args: argparse.Namespace) -> int:
    from rptq_onnx.export import export

    result = export(args.model, args.output, with_past=args.with_past, opset=args.opset, exporter=args.exporter)
    rec = result.record
    print(f"exported {rec['model_type']} ({rec['config']['num_hidden_layers']} layers, hidden {rec['config']['hidden_size']}) "
          f"→ {result.model_path}  [opset {rec['opset']}, {rec['exporter']}, {'with past' if rec['with_past'] else 'no cache'}]")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rptq_onnx.inspection import describe, format_table

    desc = describe(args.model)
    print(json.dumps(desc, indent=2) if args.json else format_table(desc))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec

    from rptq_onnx.bundled import DEMO_MODEL_DIR

    if args.model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise RptqError("no MODEL given and the bundled demo model is missing from this install; pass a MODEL")
        args.model = str(DEMO_MODEL_DIR)
        args.calib = args.calib or "sotu-train"
    if args.calib is None:
        raise RptqError("--calib FILE is required: calibration text (UTF-8) tokenized with the model's tokenizer; "
                        "--calib random gives random token ids for a smoke run")
    calib = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        batch_size=args.batch_size)
    quant = QuantSpec.for_preset(args.preset, wbits=args.wbits, abits=args.abits, kv_only=args.kv_only,
                                 weight_quant=args.weight_quant, group_size=args.group_size, observer=args.observer,
                                 matmulnbits=not args.no_matmulnbits)
    config = CompileConfig(preset=args.preset, clusters=ClusterCounts.parse(args.clusters), calib=calib,
                           layout=args.layout, quant=quant)
    result = compile_model(args.model, args.output, config, with_past=args.with_past, progress=not args.quiet)
    if args.calib == "random":
        print("note: calibrated on random token ids (--calib random): a smoke run; pass --calib FILE for real "
              "statistics", file=sys.stderr)
    rep = result.report
    print(f"compiled {rep['layers']} layers ({config.preset} = {config.name}, clusters {config.clusters}, layout {rep['layout']}, "
          f"{rep['gathers_added']} Gather(s) added) → {result.model_path}  [{rep['timings_s']['total']:.1f} s]")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from rptq_onnx.compile import resolve_onnx_source
    from rptq_onnx.evaluate import load_text, perplexity

    text = load_text(args.text)
    with tempfile.TemporaryDirectory(prefix="rptq-eval-") as tmp:
        model = resolve_onnx_source(args.model, Path(tmp), with_past=False)
        res = perplexity(model, text, seqlen=args.seqlen, max_tokens=args.max_tokens, batch_size=args.batch_size,
                         progress=not args.quiet)
    print(f"perplexity {res.perplexity:.3f}  (mean NLL {res.nll:.4f} over {res.tokens:,} predicted tokens, "
          f"{res.windows} windows, {args.text}, {res.seconds:.1f} s)")
    return 0


def _quiet_libraries() -> None:
    """Library warnings and progress bars are not ours to print; errors still are."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_parser() -> argparse.ArgumentParser:
    from rptq_onnx import __version__
    from rptq_onnx.export import DEFAULT_OPSET, EXPORTERS

    parser = argparse.ArgumentParser(prog="rptq-onnx", description="RPTQ low-bit quantization of OPT graphs in ONNX.")
    parser.add_argument("--version", action="version", version=f"rptq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a Hugging Face OPT model to ONNX",
                       description="Export a Hugging Face OPT model (hub id or local directory) to OUT_DIR/model.onnx.")
    p.add_argument("model", metavar="MODEL", help="Hugging Face hub id or local directory (config.json + weights)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output directory")
    past = p.add_mutually_exclusive_group()
    past.add_argument("--with-past", dest="with_past", action="store_true", default=True,
                      help="graph with past_key_values inputs and present outputs (default)")
    past.add_argument("--no-past", dest="with_past", action="store_false", help="graph without a KV cache")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch exporter: dynamo (default) or the legacy torchscript one")
    p.set_defaults(func=_cmd_export)

    from rptq_onnx.config import LAYOUTS, PRESETS, CalibConfig

    d = CalibConfig()
    p = sub.add_parser("compile", help="calibrate, cluster and reorder (RPTQ) an OPT model",
                       description="Calibrate per-channel ranges, cluster channels with KMeans and fold the "
                                   "reorders into the weights. MODEL is an .onnx file or anything `export` accepts.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help=".onnx file, Hugging Face model directory or hub id (default: the bundled demo OPT, "
                        "calibrated on the bundled SOTU train text)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument("--preset", default="reorder", metavar="PRESET",
                   help=f"one of {', '.join(PRESETS)} (default: reorder = W16A16, reorder only); "
                        "the *KV presets quantize only K and V activations")
    p.add_argument("--wbits", type=int, default=None, help="override the preset's weight bits (3, 4, 8, 16)")
    p.add_argument("--abits", type=int, default=None, help="override the preset's activation bits (3–8, 16)")
    p.add_argument("--kv-only", action="store_true", default=None, help="quantize only K and V activations")
    p.add_argument("--weight-quant", default="gptq", choices=("gptq", "rtn"), help="weight algorithm (default gptq)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weight group size along the input (default: per output channel; 128 for weight-only 4-bit, "
                        "which MatMulNBits needs; 0 = per channel)")
    p.add_argument("--observer", default="ema", choices=("ema", "minmax"),
                   help="activation ranges: the reference's EMA min/max (default) or plain min/max")
    p.add_argument("--no-matmulnbits", action="store_true",
                   help="weight-only 4-bit: keep DequantizeLinear+MatMul instead of MatMulNBits")
    p.add_argument("--calib", default=None, metavar="FILE|random",
                   help="calibration text file (tokenized with the model's tokenizer; required), sotu-train (the "
                        "bundled text), or 'random' token ids for smoke runs")
    p.add_argument("--nsamples", type=int, default=d.nsamples,
                   help=f"calibration windows (default {d.nsamples}; the reference uses 128)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default {d.DEFAULT_SEQLEN}, or the model's positions when fewer; "
                        "the reference uses 2048)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per ORT run (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for drawing windows (default 0)")
    p.add_argument("--clusters", default=None, metavar="R1=32,R2=4,...",
                   help="KMeans clusters per point; defaults R1=32,R2=4,R3=4,R4=32,R5=32 (R2/R3 per head); all=K sets all")
    p.add_argument("--layout", default="zero-copy", choices=LAYOUTS,
                   help="zero-copy (default): R1/R4 stay in original order, no runtime copies; contiguous: "
                        "R1/R4 reordered too, with one Gather before each LayerNorm")
    past = p.add_mutually_exclusive_group()
    past.add_argument("--with-past", dest="with_past", action="store_true", default=True,
                      help="when exporting first: graph with a KV cache (default)")
    past.add_argument("--no-past", dest="with_past", action="store_false", help="when exporting first: no KV cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("eval", help="perplexity of a model through ONNX Runtime",
                       description="Perplexity over non-overlapping windows of --seqlen tokens, run through ONNX Runtime.")
    p.add_argument("model", metavar="MODEL", help=".onnx file (tokenizer beside it), or anything `export` accepts")
    p.add_argument("--text", default="sotu-test",
                   help="a UTF-8 text file, sotu-test (bundled, default), or wikitext2/ptb/c4 (needs `datasets` + network)")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 512, or the model's positions)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=1, help="windows per ORT run (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("inspect", help="show the RPTQ layer map of an ONNX model",
                       description="Locate every RPTQ reorder point (R1–R5), K/V and heads in an OPT ONNX graph.")
    p.add_argument("model", metavar="MODEL.onnx", help="an .onnx file (or a directory holding model.onnx)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except RptqError as exc:
        print(f"rptq-onnx: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `rptq-onnx inspect … | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("rptq-onnx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("rptq-onnx: error: out of memory; use a smaller batch or model", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
