"""rptq-onnx against ONNX Runtime GenAI's own model builder, through the same GenAI decode loop.

    python -m rptq_onnx.tools.bench_genai [--model smollm2|HF_DIR|FILE.gguf|tiny] [--workdir runs/bench-genai]
        [--anchors fp32,int4,int4-kv4] [--preset W4A4KV] [--flags "..."] [--ours DIR ...] [--eval-tokens 16384]
        [--seqlen 512]
        [--new-tokens 64] [--prompt-tokens 37]

From one source model (a GGUF such as ``smollm2`` is dequantized to an fp32 Hugging Face directory
first, as the builder needs one) it builds the anchors with ``python -m
onnxruntime_genai.models.builder`` on the CPU — ``fp32``; ``int4`` (``-p int4``: RTN, blocks of
32, embedding and LM head 4-bit too); ``int4-kv4`` / ``int4-kv8`` (int4 plus
``kv_cache_quant_scheme=int4/int8_per_channel``, its scales from GenAI's own
``kv_cache_calibration`` run on the int4 build) — and ``rptq-onnx compile --preset PRESET --calib
sotu-train FLAGS``, FLAGS by default the deployment form (``DEPLOY_FLAGS``: int8 activations inside
the kernels, a 4-bit head, the Q4_1 offsets as extra blocks, the attention on integer zero points;
``--flags ""`` gives the CLI defaults). Every build is kept in ``--workdir`` and reused by the next run.

Each model is then measured the same way:

- **decode**: a fresh process loads the folder in og.Model (CPU), appends the first
  ``--prompt-tokens`` tokens of sotu-test and calls ``generate_next_token`` until
  ``--new-tokens`` are out (``min_length`` keeps EOS from ending it early); ms/token is the
  median decode step; **peak RSS** is that process's VmHWM (load + prompt + decode).
- **perplexity**: plain ONNX Runtime sessions on each model.onnx (GenAI's Generator exposes only
  the last position's logits, so a whole window cannot be scored through it): non-overlapping
  windows of ``--seqlen`` over the first ``--eval-tokens`` tokens of sotu-test, an empty cache,
  mean NLL of every predicted token — the protocol of ``rptq-onnx eval --max-tokens``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

# the form compiled for GenAI against the builder's int4 builds (README, *Against GenAI's own builder*)
DEPLOY_FLAGS = "--accuracy-level 4 --head-bits 4 --grid-offset blocks --source-grid keep-mlp"
ANCHORS = {  # name → (builder precision, KV cache scheme or None)
    "fp32": ("fp32", None),
    "int4": ("int4", None),
    "int4-kv8": ("int4", "int8_per_channel"),
    "int4-kv4": ("int4", "int4_per_channel"),
}

_DECODE_CHILD = """
import json, statistics, sys, time
import numpy as np
import onnxruntime_genai as og
folder, ids, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
gen = og.Generator(model, params)
t0 = time.perf_counter()
gen.append_tokens(np.asarray(ids, np.int32))
gen.generate_next_token()  # picks the first token from the prompt's logits
prefill, steps, tokens = time.perf_counter() - t0, [], [int(gen.get_next_tokens()[0])]
while not gen.is_done():
    t0 = time.perf_counter()
    gen.generate_next_token()  # runs the previous token, picks the next
    steps.append(time.perf_counter() - t0)
    tokens.append(int(gen.get_next_tokens()[0]))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"prefill_ms": 1000 * prefill, "ms_per_token": 1000 * statistics.median(steps),
                  "tokens": tokens, "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def run(cmd: list[str], what: str) -> None:
    print(f"[bench_genai] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SystemExit(f"{what} failed:\n{tail}")
    print(f"[bench_genai] {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def fp32_hf_dir(model: str, workdir: Path) -> Path:
    """An fp32 Hugging Face directory of ``model`` (a GGUF or ``smollm2`` dequantized with transformers,
    ``tiny`` a random tiny Llama with a tokenizer); an HF directory is used as it is."""
    path = Path(model)
    if path.is_dir():
        return path
    out = workdir / "hf"
    if (out / "config.json").is_file():
        return out
    if model == "tiny":
        from rptq_onnx.models import save_random_llama

        return save_random_llama(out, seed=1, tokenizer=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rptq_onnx.export import resolve_model_source

    source = resolve_model_source(model)
    kwargs = source.hf_kwargs()
    hf = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32, **kwargs)
    hf.hf_quantizer = None  # the weights are plain fp32 tensors now; transformers refuses to save "gguf" models
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(source.directory), **kwargs).save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:  # the weights are fp32 now, as export records them
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_anchor(name: str, hf_dir: Path, workdir: Path, calib_seq: int) -> Path:
    out = workdir / f"genai-{name}"
    if (out / "genai_config.json").is_file():
        return out
    precision, kv = ANCHORS[name]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(workdir / "builder-cache")]
    if kv:
        base = build_anchor(precision, hf_dir, workdir, calib_seq)  # its own float-cache build calibrates the scales
        scales = workdir / f"kv-scales-{kv}.json"
        if not scales.is_file():
            run([sys.executable, "-m", "onnxruntime_genai.models.quantization.kv_cache_calibration", "--model", str(base),
                 "--tokenizer", str(hf_dir), "--out", str(scales), "--quant-type", kv, "--target-seq", str(calib_seq)],
                f"GenAI KV calibration ({kv})")
        cmd += ["--extra_options", f"kv_cache_quant_scheme={kv}", f"kv_cache_scale_file={scales}"]
    run(cmd, f"GenAI builder {name}")
    return out


def build_ours(hf_dir: Path, workdir: Path, preset: str, calib: str, flags: str = DEPLOY_FLAGS) -> Path:
    """``rptq-onnx compile --preset PRESET --calib CALIB FLAGS`` into ``workdir`` (named by preset and flags)."""
    tag = "deploy" if flags == DEPLOY_FLAGS else "".join(c if c.isalnum() else "-" for c in flags.replace("--", "")).strip("-")
    out = workdir / (f"rptq-{preset}-{tag}" if tag else f"rptq-{preset}")
    if (out / "genai_config.json").is_file():
        return out
    run([sys.executable, "-m", "rptq_onnx", "compile", str(hf_dir), "-o", str(out), "--preset", preset, "--calib", calib,
         *flags.split(), "-q"], f"rptq-onnx compile {preset} {flags}".strip())
    return out


def with_accuracy_level(folder: Path, level: int) -> Path:
    """A copy of a compiled folder whose MatMulNBits run at ``accuracy_level`` (4: the activation is
    quantized to int8 per block inside the kernel, as the builder's CPU int4 models do), weights shared."""
    import shutil

    import onnx

    out = folder.parent / f"{folder.name}-acc{level}"
    if (out / "genai_config.json").is_file():
        return out
    out.mkdir(exist_ok=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", level)])
    onnx.save(model, str(out / "model.onnx"))
    for item in folder.iterdir():
        if item.name != "model.onnx" and item.is_file():
            shutil.copy2(item, out / item.name)
    return out


def describe_graph(folder: Path) -> str:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values.")), None)
    cache = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name if past is not None else "none"
    if past is not None and cache == "uint8":
        cache = "int4 in uint8"
    levels = Counter(next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)  # 0: the attribute's default
                     for n in model.graph.node if n.op_type == "MatMulNBits")
    parts = [f"{ops[op]} {op}" for op in ("MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention", "MatMul")
             if ops[op]]
    if levels:
        parts.append("accuracy_level " + ", ".join(f"{level}" if len(levels) == 1 else f"{level} ×{count}"
                                                   for level, count in sorted(levels.items())))
    return ", ".join(parts) + f"; cache {cache}"


def sotu_ids(hf_dir: Path, count: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from rptq_onnx.bundled import TEXTS

    text = TEXTS["sotu-test"].read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = np.asarray(tokenizer(text[: 8 * count + 4096], add_special_tokens=False)["input_ids"], np.int64)
    if len(ids) < count:  # a prefix of 8 characters per token was short: the whole text
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    return ids[:count]


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
          "tensor(int8)": np.int8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def window_feeds(session, window: np.ndarray, head_size: int) -> dict:
    """input_ids, attention_mask, position_ids (where the graph takes them) and an empty cache
    (its last dimension from the graph, or ``head_size`` where the builder left it symbolic)."""
    batch, length = window.shape
    feeds = {}
    for i in session.get_inputs():
        dtype = _NUMPY[i.type]
        if i.name == "input_ids":
            feeds[i.name] = window.astype(dtype)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, length), dtype)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(length, dtype=dtype), (batch, length)).copy()
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3] if isinstance(i.shape[3], int) else head_size),
                                     dtype)
        else:
            raise SystemExit(f"unexpected input {i.name}")
    return feeds


def perplexity(folder: Path, ids: np.ndarray, seqlen: int) -> float:
    from rptq_onnx.runtime import make_session

    session = make_session(folder / "model.onnx", providers=["CPUExecutionProvider"])
    head_size = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    windows = ids[: len(ids) // seqlen * seqlen].reshape(-1, seqlen)
    total, count = 0.0, 0
    for window in windows:
        logits = session.run(["logits"], window_feeds(session, window[None], head_size))[0][0, :-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        total += float((logz - logits[np.arange(seqlen - 1), window[1:]]).sum())
        count += seqlen - 1
    return math.exp(total / count)


def decode_once(folder: Path, prompt: list[int], new_tokens: int) -> dict:
    """One fresh-process GenAI decode of ``folder``: ms/token (median step), prefill, tokens, peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _DECODE_CHILD, str(folder), json.dumps(prompt), str(new_tokens)],
                          capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if proc.returncode:
        raise SystemExit(f"GenAI decode of {folder} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_rounds(folders: list[Path], prompt: list[int], new_tokens: int, repeats: int) -> list[dict]:
    """``repeats`` rounds over every model in turn (so load from other processes hits them alike):
    per model the fastest round's ms/token, every round's (``rounds``), and the highest peak RSS of its rounds."""
    best: list[dict | None] = [None] * len(folders)
    rounds: list[list[float]] = [[] for _ in folders]
    for _ in range(repeats):
        for i, folder in enumerate(folders):
            result = decode_once(folder, prompt, new_tokens)
            rounds[i].append(result["ms_per_token"])
            if best[i] is None:
                best[i] = result
            else:
                rss = max(best[i]["peak_rss_mb"], result["peak_rss_mb"])
                if result["ms_per_token"] < best[i]["ms_per_token"]:
                    best[i] = result
                best[i]["peak_rss_mb"] = rss
    for result, times in zip(best, rounds):
        result["rounds"] = times
    return best


def round_ratio(ours: dict, anchor: dict) -> str:
    """The decode ratio round by round (each round times both back to back, so a slow spell of the shared
    machine hits both): median and range; a fastest-vs-fastest ratio can pair an anchor's lucky round with
    an ordinary one of ours, or the reverse."""
    ratios = sorted(a / b for a, b in zip(ours["rounds"], anchor["rounds"]))
    if len(ratios) < 2:
        return ""
    return f" (round by round: median {statistics.median(ratios):.2f}×, {ratios[0]:.2f}–{ratios[-1]:.2f}×)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), an HF directory, a .gguf, or tiny")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-genai"))
    parser.add_argument("--anchors", default="fp32,int4,int4-kv4", help=f"of {', '.join(ANCHORS)}")
    parser.add_argument("--preset", default="W4A4KV", help="rptq-onnx preset to compile (CLI defaults otherwise)")
    parser.add_argument("--calib", default="sotu-train")
    parser.add_argument("--flags", default=DEPLOY_FLAGS,
                        help=f'more compile flags for the model compiled here (default "{DEPLOY_FLAGS}", the deployment '
                             'form; "" for the CLI defaults)')
    parser.add_argument("--ours", type=Path, nargs="*", default=None,
                        help="already compiled rptq-onnx directories to measure instead of compiling --preset")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=37)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="decode rounds over all models (per model the fastest is kept)")
    parser.add_argument("--accuracy-level", type=int, default=None,
                        help="also measure each rptq-onnx model with its MatMulNBits set to this accuracy_level "
                             "(4 = int8 activations inside the kernel, the builder's CPU default)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    args.workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = fp32_hf_dir(args.model, args.workdir)
    config = json.loads((hf_dir / "config.json").read_text())
    seqlen = min(args.seqlen, int(config.get("max_position_embeddings") or args.seqlen))
    rows = [(f"GenAI builder {name}", build_anchor(name, hf_dir, args.workdir, seqlen))
            for name in filter(None, args.anchors.split(","))]
    ours = args.ours if args.ours is not None else [build_ours(hf_dir, args.workdir, args.preset, args.calib, args.flags)]
    rows += [(f"rptq-onnx {d.name}", d) for d in ours]
    if args.accuracy_level is not None:
        rows += [(f"rptq-onnx {d.name}, accuracy_level {args.accuracy_level}", with_accuracy_level(d, args.accuracy_level))
                 for d in ours]

    ids = sotu_ids(hf_dir, max(args.eval_tokens, args.prompt_tokens))
    prompt = [int(t) for t in ids[: args.prompt_tokens]]
    ppls, cache_file = [], args.workdir / "perplexity-cache.json"  # a rerun for decode figures scores nothing again
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for name, folder in rows:
        t0 = time.perf_counter()
        key = f"{folder.resolve()}|{(folder / 'model.onnx').stat().st_mtime_ns}|{args.eval_tokens}|{seqlen}"
        if key not in cached:
            cached[key] = perplexity(folder, ids[: args.eval_tokens], seqlen)
            cache_file.write_text(json.dumps(cached, indent=1))
        ppls.append(cached[key])
        print(f"[bench_genai] {name}: ppl {ppls[-1]:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    decodes = decode_rounds([folder for _, folder in rows], prompt, args.new_tokens, args.repeats)
    results = [(name, describe_graph(folder), ppl, dec) for (name, folder), ppl, dec in zip(rows, ppls, decodes)]

    print(f"\n{args.model}: perplexity on the first {args.eval_tokens:,} tokens of sotu-test in windows of {seqlen} "
          f"(plain ORT sessions); decode through onnxruntime-genai {_genai_version()} on the CPU, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (median step, fastest of {args.repeats} "
          f"round(s)); peak RSS = load + decode, a fresh process per run\n")
    print("| model | graph | PPL | decode ms/token | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    for name, graph, ppl, dec in results:
        print(f"| {name} | {graph} | {ppl:.2f} | {dec['ms_per_token']:.1f} | {dec['peak_rss_mb']:,.0f} |")
    anchor = next((r for r in results if r[0] == "GenAI builder int4-kv4"), None)
    if anchor is not None:
        for name, _, ppl, dec in results:
            if name.startswith("rptq-onnx"):
                print(f"\n{name} ÷ GenAI int4-kv4: decode {dec['ms_per_token'] / anchor[3]['ms_per_token']:.2f}×"
                      f"{round_ratio(dec, anchor[3])}, "
                      f"peak RSS {dec['peak_rss_mb'] / anchor[3]['peak_rss_mb']:.2f}×, "
                      f"perplexity {ppl:.2f} vs {anchor[2]:.2f}")
    return 0


def _genai_version() -> str:
    from importlib import metadata

    return metadata.version("onnxruntime-genai-cuda")


if __name__ == "__main__":
    raise SystemExit(main())
