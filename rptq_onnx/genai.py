"""ONNX Runtime GenAI model folders: ``genai_config.json`` beside model.onnx, and generation through it.

GenAI (``onnxruntime_genai``: og.Model, og.Tokenizer, og.Generator) runs a decoder from a folder
holding the ONNX graph, ``genai_config.json`` and the Hugging Face tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``), which ``export`` and ``compile`` already copy.
``write_genai_config`` adds the config when GenAI can hold the graph's cache:

- **inputs/outputs**: our names (``input_ids``, ``attention_mask``, Llama's ``position_ids``,
  ``past_key_values.%d.key/value`` → ``logits``, ``present.%d.key/value``).
- **cache**: GenAI allocates the empty past as [batch, kv_heads, 0, width] of the element type the
  graph declares, and takes a static last dimension from the graph, so a float cache and the
  fused attention's low-bit caches (int8 [B, kv, T, D], int4 codes two per byte in uint8
  [B, kv, T, D/2]) need nothing more in the config; GroupQueryAttention's ``seqlens_k`` and
  ``total_sequence_length`` are computed inside our graph from ``attention_mask``. The eager
  low-bit cache, [batch, heads·head_dim, tokens] codes, cannot be allocated by GenAI: no config.
- **past_present_share_buffer: false**: the graph's additive mask is built from the past's length,
  so the past must be exactly the tokens so far, not a max-length buffer.
- **type**: OPT is not a GenAI model type; ``decoder``, its generic decoder-only type, runs it (the
  graph derives positions from the attention mask). Llama-family models keep their own type.
- **search defaults** from generation_config.json; the stop ids are config.json's EOS and every
  ``eos_token_id`` listed in generation_config.json, as ``rptq-onnx generate`` stops.
- **session options** as ``runtime.make_session`` sets them: ORT's QDQ fusions off (per-channel
  activation Q/DQ would make ORT CPU fail).

This module imports onnxruntime_genai only inside ``GenaiGenerator`` (an optional extra).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from rptq_onnx.artifacts import GENAI_CONFIG_NAME
from rptq_onnx.errors import RptqError

INSTALL_HINT = ("pip install onnxruntime-genai-cuda==0.18.0 (or pip install -e '.[genai]'; not the plain "
                "onnxruntime-genai, which installs a second onnxruntime)")
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# element types GenAI's default KV cache can allocate (its own type from the graph's first past input)
CACHE_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}
GENAI_TYPES = {"llama", "mistral", "qwen2"}  # HF model types GenAI knows under the same name
# ORT session entries as runtime.make_session sets them (GenAI passes unknown keys as config entries)
SESSION_ENTRIES = {"session.disable_quant_qdq": "1",
                   "optimization.disable_specified_optimizers": "QDQSelectorActionTransformer"}


@dataclass(frozen=True)
class CacheLayout:
    """The graph's KV cache as GenAI would hold it."""

    layers: int
    kv_heads: int
    width: int  # last dimension: head_dim, or head_dim/2 for int4 codes packed in uint8
    dtype: str  # float32, float16, uint8, int8

    def kind(self, head_dim: int) -> str:
        if self.dtype == "uint8" and self.width < head_dim:
            return "int4 (two codes per byte, in uint8)"
        return self.dtype

    @property
    def bytes_per_token_per_layer(self) -> int:
        """K + V bytes for one token of one sequence in one layer."""
        itemsize = 4 if self.dtype == "float32" else 2 if self.dtype == "float16" else 1
        return 2 * self.kv_heads * self.width * itemsize


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def cache_layout(model: onnx.ModelProto) -> CacheLayout:
    """The graph's cache, or RptqError saying in one line why GenAI cannot run it."""
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise RptqError(f"the graph has no {name} input; onnxruntime-genai needs an rptq-onnx export or compile")
    if "logits" not in outputs:
        raise RptqError("the graph has no logits output; onnxruntime-genai needs an rptq-onnx export or compile")
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    if layers == 0:
        raise RptqError("the model has no KV cache; onnxruntime-genai needs a with-past graph (export or compile with "
                        "--with-past, the default)")
    first = inputs.get(PAST_KEY % 0)
    missing = [n % i for i in range(layers) for n in (PAST_KEY, PAST_VALUE) if n % i not in inputs] + \
              [n % i for i in range(layers) for n in (PRESENT_KEY, PRESENT_VALUE) if n % i not in outputs]
    if first is None or missing:
        raise RptqError(f"cache inputs/outputs {', '.join(missing[:2]) or PAST_KEY % 0} are missing; re-export the model")
    elem, dims = first.type.tensor_type.elem_type, _dims(first)
    if elem not in CACHE_TYPES or len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
        kind = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem != onnx.TensorProto.UINT4 else "uint4"
        shape = "[" + ", ".join(map(str, dims)) + "]"
        raise RptqError(f"the cache is {kind} {shape} (the eager low-bit cache, [batch, heads·head_dim, tokens] codes), "
                        "which onnxruntime-genai cannot allocate; compile with --attention fused (the KV presets' "
                        "default) or --float-cache")
    return CacheLayout(layers=layers, kv_heads=dims[1], width=dims[3], dtype=CACHE_TYPES[elem])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def genai_config(model: onnx.ModelProto, folder: Path) -> dict:
    """The ``genai_config.json`` content for ``model`` with config.json (and generation_config.json)
    in ``folder``; RptqError when GenAI cannot run it."""
    cache = cache_layout(model)
    cfg = _read_json(folder / "config.json")
    if "num_attention_heads" not in cfg:
        raise RptqError(f"{folder}: no config.json beside the model; export or compile from a model directory")
    gen = _read_json(folder / "generation_config.json")
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    context = int(cfg.get("max_position_embeddings") or 2048)
    eos = list(dict.fromkeys(_ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))))
    if not eos:
        raise RptqError(f"{folder}: config.json names no eos_token_id, which onnxruntime-genai needs to stop")
    pad = (_ids(cfg.get("pad_token_id")) or _ids(gen.get("pad_token_id")) or eos)[0]
    bos = (_ids(cfg.get("bos_token_id")) or _ids(gen.get("bos_token_id")) or eos)[0]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if any(v.name == "position_ids" for v in model.graph.input):
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names=PAST_KEY, past_value_names=PAST_VALUE)
    model_type = cfg.get("model_type")
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": [],
                                    **SESSION_ENTRIES},
                "filename": "model.onnx",
                "head_size": head_dim,
                "hidden_size": int(cfg["hidden_size"]),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": heads,
                "num_hidden_layers": cache.layers,
                "num_key_value_heads": cache.kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": float(gen.get("length_penalty", 1.0)),
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size", 0)),
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }


def write_genai_config(model: onnx.ModelProto, folder: Path) -> bool:
    """Write ``folder/genai_config.json`` for ``model`` if GenAI can run it; returns whether it did.

    ``folder`` holds (or will hold) model.onnx with config.json and the tokenizer files beside it."""
    try:
        config = genai_config(model, folder)
    except RptqError:
        return False
    (folder / GENAI_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return True


def import_genai():
    """``onnxruntime_genai``, or RptqError naming the package to install."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:  # also a wheel whose native libraries fail to load
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RptqError(f"--runtime genai needs onnxruntime-genai, which is not importable here ({reason}); "
                        f"{INSTALL_HINT}") from None
    return og


def model_folder(model: str | os.PathLike) -> Path:
    """The folder of a GenAI model (a directory holding model.onnx, or the .onnx file's directory)."""
    path = Path(model)
    folder = path if path.is_dir() else path.parent
    if not (folder / "model.onnx").is_file() or (path.suffix == ".onnx" and path.name != "model.onnx"):
        raise RptqError(f"{model}: no model.onnx here; --runtime genai runs a directory written by rptq-onnx export "
                        "or compile")
    return folder


def check_folder(folder: Path) -> tuple[dict, CacheLayout]:
    """The folder's genai_config.json and cache, or RptqError saying why GenAI cannot run the model."""
    from rptq_onnx.graph import load_model

    layout = cache_layout(load_model(folder / "model.onnx", load_weights=False))  # no cache, eager low-bit cache
    config = _read_json(folder / GENAI_CONFIG_NAME)
    if "model" not in config:
        raise RptqError(f"{folder}: no {GENAI_CONFIG_NAME}; export or compile the model again with this rptq-onnx, "
                        "which writes it beside model.onnx")
    return config, layout


class GenaiGenerator:
    """A GenAI model folder loaded in og.Model with og.Tokenizer; ``generate`` runs og.Generator per prompt."""

    def __init__(self, model: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        from rptq_onnx.runtime import default_providers

        self.folder = model_folder(model)
        self.config, self.layout = check_folder(self.folder)  # before the import: a bad model is said first
        og = import_genai()
        self.og = og
        config = og.Config(str(self.folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        providers = providers or default_providers()
        config.clear_providers()
        if providers[0] == "CUDAExecutionProvider":
            config.append_provider("cuda")
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        try:
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise RptqError(f"{self.folder}: onnxruntime-genai could not load the model ({reason})") from None
        decoder = self.config["model"]["decoder"]
        self.head_dim = int(decoder["head_size"])
        self.max_positions = int(self.config["model"]["context_length"])
        self.stop_ids = _ids(self.config["model"]["eos_token_id"])

    @property
    def cache_kind(self) -> str:
        return self.layout.kind(self.head_dim)

    @property
    def has_chat_template(self) -> bool:
        tok_config = _read_json(self.folder / "tokenizer_config.json")
        return (self.folder / "chat_template.jinja").is_file() or bool(tok_config.get("chat_template"))

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        if not prompt.strip():
            raise RptqError("the prompt is empty; pass some text with --prompt")
        if chat and self.has_chat_template:
            prompt = self.tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                                        add_generation_prompt=True)
        return [int(t) for t in self.tokenizer.encode(prompt)]

    def decode(self, tokens: list[int]) -> str:
        """Text of ``tokens`` through og's token stream (``Tokenizer.decode`` stops at the first incomplete
        UTF-8 sequence; the stream drops such a piece and goes on)."""
        stream = self.tokenizer.create_stream()
        return "".join(stream.decode(t) for t in tokens)

    def generate(self, prompts: list[str], max_new_tokens: int = 32, sampling=None, chat: bool = True):
        """Each prompt through its own og.Generator (greedy unless ``sampling.do_sample``), stopping at the
        config's EOS ids as GenAI does; a ``generate.Generation``."""
        if not prompts:
            raise RptqError("no prompt given; pass --prompt TEXT")
        return self.generate_ids([self.encode(p, chat) for p in prompts], max_new_tokens, sampling, prompts)

    def generate_ids(self, encoded: list[list[int]], max_new_tokens: int = 32, sampling=None,
                     prompts: list[str] | None = None):
        from rptq_onnx.generate import CacheFootprint, Generation, Sampling

        if max_new_tokens < 1:
            raise RptqError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        if not encoded or not all(encoded):
            raise RptqError("the prompt is empty; pass some text with --prompt")
        longest = max(len(ids) for ids in encoded)
        if longest >= self.max_positions:
            raise RptqError(f"the prompt is {longest} tokens, the model has {self.max_positions} positions; "
                            f"shorten it below {self.max_positions} tokens")
        sampling = sampling or Sampling()
        texts, tokens, prefill, steps, truncated, cache_bytes, cache_tokens = [], [], 0.0, [], False, 0, 0
        for ids in encoded:
            length = min(len(ids) + max_new_tokens, self.max_positions)
            truncated |= length < len(ids) + max_new_tokens
            new, seconds, generator = self._decode(ids, length, sampling)
            prefill += seconds[0]
            steps += seconds[1:]
            stop = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
            tokens.append(new if stop is None else new[:stop])
            texts.append(self.decode(tokens[-1]))
            cache_bytes, cache_tokens = self._cache_bytes(generator)
        prompts = list(prompts) if prompts is not None else [self.decode(e) for e in encoded]
        cache = CacheFootprint(element_type=f"tensor({self.layout.dtype})", batch=1, tokens=cache_tokens,
                               layers=self.layout.layers, bytes_total=cache_bytes)
        return Generation(prompts=prompts, texts=texts, new_tokens=tokens, prompt_tokens=[len(e) for e in encoded],
                          prefill_seconds=prefill, step_seconds=steps, cache=cache, truncated=truncated)

    def _decode(self, ids: list[int], length: int, sampling):
        """(new tokens, [prefill s, decode step s, …], the generator) for one prompt.

        ``append_tokens`` runs the prompt; each ``generate_next_token`` picks a token from the last
        logits, and from the second one on first runs the previous token: the prefill is the first
        two calls, a decode step each later one (as ``rptq-onnx generate`` counts them)."""
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        options = {"max_length": length, "do_sample": sampling.do_sample, "num_beams": 1, "repetition_penalty": 1.0}
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k or self.config["model"]["vocab_size"],
                           top_p=sampling.top_p, random_seed=sampling.seed)
        else:
            options.update(top_k=1, top_p=1.0, temperature=1.0)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        seconds, new = [], []
        t0 = time.perf_counter()
        generator.append_tokens(np.asarray(ids, np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        return new, seconds, generator

    def _cache_bytes(self, generator) -> tuple[int, int]:
        """(bytes of every present K and V, tokens held) as GenAI returns them after the last step."""
        total, tokens = 0, 0
        for i in range(self.layout.layers):
            for name in (PRESENT_KEY % i, PRESENT_VALUE % i):
                value = generator.get_output(name)
                total += value.nbytes
                tokens = value.shape[2]
        return total, tokens
