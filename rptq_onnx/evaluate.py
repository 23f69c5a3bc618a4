"""Perplexity through ONNX Runtime (`rptq-onnx eval`).

Non-overlapping windows of ``seqlen`` tokens over the whole text (as the reference evaluates
WikiText-2), each run as a prefill through the session factory; perplexity = exp(mean NLL
over every predicted token, i.e. seqlen − 1 per window). Logits are reduced to per-token NLL
window by window, so memory holds at most one batch of [batch, seqlen, vocab] float32 logits.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rptq_onnx.artifacts import model_limits
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import load_model
from rptq_onnx.runtime import feeds_for, make_session
from rptq_onnx.text import load_tokenizer, read_text, token_ids

HF_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
               "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
               "c4": ("allenai/c4", "en", "validation", "text")}


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    windows: int
    tokens: int
    seconds: float


def load_text(name: str) -> str:
    """A local UTF-8 file, a bundled text (``sotu-test``), or an HF datasets name (network needed)."""
    if name in HF_DATASETS:
        path, config, split, field = HF_DATASETS[name]
        try:
            import datasets  # noqa: F401 (optional dependency)
            from datasets import load_dataset

            rows = load_dataset(path, config, split=split)
        except Exception as exc:
            raise RptqError(f"--text {name}: could not load it through Hugging Face `datasets` ({type(exc).__name__}; "
                            "needs `pip install datasets` and network access); pass a local text file instead") from None
        return "\n\n".join(rows[field])
    return read_text(name)


def perplexity(model_path: str | os.PathLike, text: str, seqlen: int | None = None, max_tokens: int | None = None,
               batch_size: int = 1, progress: bool = True, providers: list[str] | None = None) -> PerplexityResult:
    model_path = Path(model_path)
    skeleton = load_model(model_path, load_weights=False)
    _, max_pos = model_limits(model_path, skeleton)
    seqlen = seqlen or min(512, max_pos or 512)
    if max_pos is not None and seqlen > max_pos:
        raise RptqError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions; use --seqlen ≤ {max_pos}")
    ids = leading_token_ids(text, model_path.parent, max_tokens) if max_tokens else token_ids(text, model_path.parent)
    if ids is None:
        raise RptqError(f"{model_path.parent}: no tokenizer beside the model; export from a directory with tokenizer files")
    n = len(ids) // seqlen
    if n == 0:
        have = f"--max-tokens {max_tokens} keeps" if max_tokens == len(ids) else "the text has"
        raise RptqError(f"{have} {len(ids)} tokens, fewer than one window of --seqlen {seqlen}; "
                        "use more tokens or a smaller --seqlen")
    windows = ids[:n * seqlen].reshape(n, seqlen)
    session = make_session(model_path, providers=providers)
    total, count, t0 = 0.0, 0, time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress or None):
        batch = windows[start:start + batch_size]
        logits = session.run(["logits"], feeds_for(session, batch))[0]
        total += float(token_nll(logits[:, :-1], batch[:, 1:]).sum())
        count += batch[:, 1:].size
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, windows=n, tokens=count,
                            seconds=time.perf_counter() - t0)


def leading_token_ids(text: str, model_dir: Path, count: int, margin: int = 256) -> np.ndarray | None:
    """The first ``count`` tokens of ``text`` as tokenizing all of it gives them, from a prefix only.

    A prefix ending at a line end, of about 5 characters per token for ``count + margin`` tokens
    (lengthened by the characters per token seen while it has fewer), is confirmed by a prefix
    ``4 · margin`` characters longer that agrees on the first ``count`` tokens: a tokenizer merges
    across the cut only near it, and a 4 MB text is not tokenized for 64 k tokens. The whole text
    when the prefix would be over half of it.
    """
    cut, previous = 5 * (count + margin), None
    tokenizer = load_tokenizer(model_dir)
    while True:
        end = text.find("\n", cut)
        end = len(text) if end < 0 or 2 * end > len(text) else end + 1  # over half of it: tokenize it all
        if tokenizer is None or end == len(text):
            ids = token_ids(text, model_dir)  # as without --max-tokens (and cached the same way)
            return ids if ids is None else ids[:count]
        ids = np.asarray(tokenizer(text[:end], add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(ids) < count + margin:
            cut = int(1.2 * end * (count + margin) / len(ids)) if len(ids) else 2 * end
            continue
        if previous is not None and np.array_equal(previous[:count], ids[:count]):
            return ids[:count]
        previous, cut = ids, end + 4 * margin


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−log softmax(logits)[target] per position: exp in float32, sums and the result in float64
    (within 1e-8 of an all-float64 computation, 4× faster on [seq, vocab] logits)."""
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0].astype(np.float64) + np.log(np.exp(logits - m).sum(-1, dtype=np.float64))
    return lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(np.float64)


@dataclass(frozen=True)
class ClozeResult:
    accuracy: float
    examples: int
    context: int


def cloze_examples(tokenizer, text: str, examples: int, context: int) -> list[tuple[list[int], list[int]]]:
    """LAMBADA-style items: (up to ``context`` tokens before a sentence's last word, that word's tokens).

    Eligible sentences end in an alphabetic word of at least 4 letters and have at least 8 words;
    ``examples`` of them are taken evenly spaced through the text (deterministic).
    """
    import re

    items = []
    for m in re.finditer(r"[^.!?]+[.!?]", text):
        sentence = m.group(0)
        words = sentence.split()
        last = re.sub(r"[^\w']+$", "", words[-1]) if words else ""
        if len(words) < 8 or len(last) < 4 or not last.isalpha():
            continue
        cut = m.start() + sentence.rindex(last)
        items.append((cut, last))
    if not items:
        raise RptqError("the text has no sentences usable for the cloze test (≥ 8 words ending in a word)")
    step = max(1, len(items) // examples)
    out = []
    for cut, word in items[::step][:examples]:
        before = text[max(0, cut - 8 * context):cut].rstrip(" ")
        ctx = tokenizer(before, add_special_tokens=False)["input_ids"][-context:]
        target = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if ctx:
            out.append((ctx, target))
    return out


def cloze_accuracy(model_path: str | os.PathLike, text: str, examples: int = 200, context: int = 128,
                   progress: bool = True, providers: list[str] | None = None) -> ClozeResult:
    """Share of items whose last word the model predicts exactly (greedy, every token of the word)."""
    model_path = Path(model_path)
    tokenizer = load_tokenizer(model_path.parent)
    if tokenizer is None:
        raise RptqError(f"{model_path.parent}: no tokenizer beside the model; export from a directory with tokenizer files")
    _, max_pos = model_limits(model_path, load_model(model_path, load_weights=False))
    context = min(context, (max_pos or context + 16) - 16)
    items = cloze_examples(tokenizer, text, examples, context)
    session = make_session(model_path, providers=providers)
    hits = 0
    for ctx, target in tqdm(items, desc="cloze", unit="item", disable=not progress or None):
        ids = np.asarray([ctx + target], dtype=np.int64)
        logits = session.run(["logits"], feeds_for(session, ids))[0][0]
        predicted = logits[len(ctx) - 1:len(ctx) - 1 + len(target)].argmax(-1)
        hits += int((predicted == np.asarray(target)).all())
    return ClozeResult(accuracy=hits / len(items), examples=len(items), context=context)
