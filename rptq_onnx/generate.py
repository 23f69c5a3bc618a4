"""Text generation through ONNX Runtime with the KV cache held between steps (`rptq-onnx generate`).

The cache lives in ``OrtValue``s from one step to the next and never passes through NumPy
(4-bit tensors cannot): each step binds the previous step's ``present.*`` outputs as its
``past_key_values.*`` inputs with an IOBinding, on the device the session runs on (CUDA memory
under the CUDA provider). On a model compiled with a KV preset the cache values are uint4
(two per byte) or uint8 codes; on an FP export or with ``--float-cache`` they are float32.

Prompts of different lengths are batched with left padding (OPT derives positions from the
attention mask; Llama graphs take ``position_ids``, derived here from the mask the same way, so
padded and unpadded prompts give the same tokens). A tokenizer with a chat template (an
instruct model such as SmolLM2) gets each prompt as one user message, unless ``chat=False``.
Greedy by default; sampling with temperature, top-k and top-p when asked.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rptq_onnx.artifacts import model_limits
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import load_model
from rptq_onnx.runtime import as_ort_values, feeds_for, make_session, position_ids
from rptq_onnx.text import load_tokenizer

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``do_sample`` is False; else temperature, then top-k, then top-p (nucleus)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise RptqError(f"--temperature {self.temperature}: must be > 0 (use greedy decoding for 0)")
        if self.top_k < 0:
            raise RptqError(f"--top-k {self.top_k}: must be ≥ 0 (0 = no cut)")
        if not 0 < self.top_p <= 1:
            raise RptqError(f"--top-p {self.top_p}: must be in (0, 1]")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Next token per row of ``logits`` [batch, vocab]."""
        if not self.do_sample:
            return logits.argmax(-1)
        x = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(x, axis=-1)[:, -min(self.top_k, x.shape[-1])][:, None]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(p, order, -1)
            keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < self.top_p  # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])


@dataclass(frozen=True)
class CacheFootprint:
    """The cache as ONNX Runtime holds it after the last step, measured from the OrtValues."""

    element_type: str  # e.g. tensor(uint4)
    batch: int
    tokens: int
    layers: int
    bytes_total: int  # tensor_size_in_bytes summed over every present K and V

    @property
    def bytes_per_token_per_layer(self) -> float:
        """K + V bytes for one token of one sequence in one layer."""
        return self.bytes_total / (self.batch * self.tokens * self.layers)


@dataclass
class Generation:
    prompts: list[str]
    texts: list[str]  # the completions (new text only)
    new_tokens: list[list[int]]
    prompt_tokens: list[int]
    prefill_seconds: float
    step_seconds: list[float]
    cache: CacheFootprint | None
    truncated: bool  # stopped at the model's positions before --max-new-tokens
    step_logits: list[np.ndarray] = field(default_factory=list)  # [batch, vocab] per generated token, if kept


class Generator:
    """A with-past ONNX model, its tokenizer and a session; ``generate`` runs the decode loop."""

    def __init__(self, model_path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None,
                 tokenizer_dir: str | os.PathLike | None = None):
        path = Path(model_path)
        path = path / "model.onnx" if path.is_dir() else path
        if not path.is_file():
            raise RptqError(f"{model_path}: no such model; pass a directory holding model.onnx or an .onnx file")
        skeleton = load_model(path, load_weights=False)
        self.vocab, self.max_positions = model_limits(path, skeleton)
        del skeleton
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else path.parent
        self.tokenizer = load_tokenizer(tok_dir)
        if self.tokenizer is None:
            raise RptqError(f"{tok_dir}: no tokenizer beside the model; export or compile from a directory with "
                            "tokenizer files")
        self.session = make_session(path, providers=providers, threads=threads)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.takes_positions = any(i.name == "position_ids" for i in self.session.get_inputs())
        if not self.past_inputs:
            raise RptqError(f"{path}: the model has no KV cache inputs; generate needs a with-past graph "
                            "(export or compile with --with-past, the default)")
        outputs = {o.name for o in self.session.get_outputs()}
        self.present_for = {i.name: PRESENT_PREFIX + i.name[len(PAST_PREFIX):] for i in self.past_inputs}
        missing = [p for p in self.present_for.values() if p not in outputs]
        if missing:
            raise RptqError(f"{path}: cache outputs {', '.join(missing[:2])} are missing; re-export the model")
        eos = self.tokenizer.eos_token_id
        self.eos_id = int(eos) if eos is not None else None
        self.stop_ids = _stop_ids(self.eos_id, tok_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (self.eos_id or 0)

    @property
    def cache_type(self) -> str:
        return self.past_inputs[0].type

    def empty_past(self, batch: int) -> dict[str, ort.OrtValue]:
        feed = feeds_for(self.session, np.zeros((batch, 1), np.int64))  # empty float or low-bit past
        return as_ort_values({i.name: feed[i.name] for i in self.past_inputs})

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, ort.OrtValue],
             all_logits: bool = False) -> tuple[np.ndarray, dict[str, ort.OrtValue]]:
        """One forward pass: (logits of the last position [batch, vocab] or all [batch, seq, vocab], next past)."""
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.takes_positions:
            io.bind_cpu_input("position_ids", position_ids(attention_mask, input_ids.shape[1]))
        for name, value in past.items():
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for present in self.present_for.values():
            io.bind_output(present, self.device)
        self.session.run_with_iobinding(io)
        outs = dict(zip([o.name for o in self.session.get_outputs()], io.get_outputs()))
        logits = outs["logits"].numpy()
        nxt = {name: outs[present] for name, present in self.present_for.items()}
        return (logits if all_logits else logits[:, -1]), nxt

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompts: list[str], chat: bool = True) -> list[list[int]]:
        """Token ids per prompt; with ``chat`` and a chat template, each prompt is one user turn."""
        if not prompts:
            raise RptqError("no prompt given; pass --prompt TEXT")
        encoded = []
        for text in prompts:
            if not text.strip():
                raise RptqError("the prompt is empty; pass some text with --prompt")
            if chat and self.has_chat_template:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = self.tokenizer(text)["input_ids"]
            encoded.append(list(ids))
        return encoded

    def generate(self, prompts: list[str], max_new_tokens: int = 32, sampling: Sampling | None = None,
                 keep_logits: bool = False, stop_at_eos: bool = True, chat: bool = True) -> Generation:
        return self.generate_ids(self.encode(prompts, chat), max_new_tokens, sampling, keep_logits, stop_at_eos,
                                 prompts)

    def generate_ids(self, encoded: list[list[int]], max_new_tokens: int = 32, sampling: Sampling | None = None,
                     keep_logits: bool = False, stop_at_eos: bool = True, prompts: list[str] | None = None) -> Generation:
        """``generate`` from token ids (one list per sequence)."""
        if max_new_tokens < 1:
            raise RptqError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        if not encoded or not all(encoded):
            raise RptqError("the prompt is empty; pass some text with --prompt")
        longest = max(len(ids) for ids in encoded)
        if self.max_positions is not None and longest >= self.max_positions:
            raise RptqError(f"the prompt is {longest} tokens, the model has {self.max_positions} positions; "
                            f"shorten it below {self.max_positions} tokens")
        sampling = sampling or Sampling()
        rng = np.random.default_rng(sampling.seed)
        batch, length = len(encoded), max(len(ids) for ids in encoded)
        room = (self.max_positions - length) if self.max_positions is not None else max_new_tokens
        steps = min(max_new_tokens, room)
        ids = np.full((batch, length), self.pad_id, np.int64)
        mask = np.zeros((batch, length), np.int64)
        for row, seq in enumerate(encoded):  # left padding
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1

        t0 = time.perf_counter()
        logits, past = self.step(ids, mask, self.empty_past(batch))
        prefill = time.perf_counter() - t0
        new = np.zeros((batch, 0), np.int64)
        done = np.zeros(batch, bool)
        kept, times = [], []
        for i in range(steps):
            if keep_logits:
                kept.append(logits)
            token = sampling.choose(logits, rng)
            if self.stop_ids:
                token = np.where(done, self.pad_id, token)
                done |= np.isin(token, self.stop_ids)
            new = np.concatenate([new, token[:, None]], axis=1)
            if (stop_at_eos and done.all()) or i == steps - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            t0 = time.perf_counter()
            logits, past = self.step(token[:, None], mask, past)
            times.append(time.perf_counter() - t0)

        texts, tokens = [], []
        for row in new:
            row = [int(t) for t in row]
            stop = next((j for j, t in enumerate(row) if t in self.stop_ids), None)
            if stop is not None:
                row = row[:stop]
            tokens.append(row)
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        prompts = list(prompts) if prompts is not None else [self.tokenizer.decode(e) for e in encoded]
        return Generation(prompts=prompts, texts=texts, new_tokens=tokens,
                          prompt_tokens=[len(e) for e in encoded], prefill_seconds=prefill, step_seconds=times,
                          cache=footprint(past, self.cache_type), truncated=steps < max_new_tokens,
                          step_logits=kept)


def footprint(past: dict[str, ort.OrtValue], element_type: str) -> CacheFootprint:
    """Bytes of a cache as measured from its OrtValues (``tensor_size_in_bytes``)."""
    values = list(past.values())
    shape = values[0].shape()
    # float caches are [batch, heads, tokens, head_dim]; low-bit ones [batch, channels, tokens]
    tokens = shape[2]
    return CacheFootprint(element_type=element_type, batch=shape[0], tokens=tokens, layers=len(values) // 2,
                          bytes_total=sum(v.tensor_size_in_bytes() for v in values))


def cache_codes(value: ort.OrtValue) -> np.ndarray:
    """The integer codes of a uint4 / uint8 cache OrtValue on the CPU, as uint8 (for checks and inspection).

    4-bit tensors cannot be turned into NumPy arrays by ONNX Runtime: this reads the packed buffer
    (two codes per byte, low nibble first) and unpacks it.
    """
    import ctypes

    if value.device_name().lower() != "cpu":
        raise RptqError("cache_codes reads CPU OrtValues only")
    kind = value.data_type()
    if kind == "tensor(uint8)":
        return value.numpy()
    if kind != "tensor(uint4)":
        raise RptqError(f"a {kind} cache holds no integer codes")
    shape = value.shape()
    n = int(np.prod(shape))
    raw = np.frombuffer(ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes()), np.uint8) if n else \
        np.zeros(0, np.uint8)
    codes = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:n]
    return codes.reshape(shape)


def codes_to_ortvalue(codes: np.ndarray, element_type: str) -> ort.OrtValue:
    """A CPU cache OrtValue of ``element_type`` (tensor(uint4) or tensor(uint8)) holding ``codes``.

    The inverse of ``cache_codes``: uint4 codes are packed two per byte, low nibble first.
    """
    import ctypes

    from onnx import TensorProto

    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if element_type == "tensor(uint8)":
        return ort.OrtValue.ortvalue_from_numpy(codes)
    if element_type != "tensor(uint4)":
        raise RptqError(f"cannot build a {element_type} cache from integer codes")
    if codes.size and codes.max() > 15:
        raise RptqError("uint4 codes must be 0..15")
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = np.ascontiguousarray(flat[0::2] | (flat[1::2] << 4))
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(codes.shape), TensorProto.UINT4)
    if packed.size:
        ctypes.memmove(value.data_ptr(), packed.ctypes.data, value.tensor_size_in_bytes())
    return value


def _stop_ids(eos_id: int | None, tok_dir: Path) -> list[int]:
    """The tokenizer's EOS and every ``eos_token_id`` in generation_config.json (e.g. an instruct
    model's end-of-turn token beside its end-of-text)."""
    ids = [] if eos_id is None else [eos_id]
    gen = tok_dir / "generation_config.json"
    if gen.is_file():
        try:
            listed = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            listed = None
        for t in listed if isinstance(listed, list) else [listed]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids
