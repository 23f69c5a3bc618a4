"""Text and tokenizers: reading a text file (or a bundled text by name) and tokenizing it with the
tokenizer saved beside a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rptq_onnx.bundled import text_path
from rptq_onnx.errors import RptqError
from rptq_onnx.heldout import heldout_text


TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer_config.json")  # one of them: a tokenizer


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in TOKENIZER_MARKERS)


def load_tokenizer(model_dir: Path):
    """The fast tokenizer saved beside the model (``export`` copies it), or None."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise RptqError(f"{model_dir}: the tokenizer files could not be loaded ({reason})") from None


_TOKEN_CACHE: dict[tuple[str, str], np.ndarray] = {}


def token_ids(text: str, model_dir: Path) -> np.ndarray | None:
    """``text`` tokenized (no special tokens) with the tokenizer beside the model, or None without one.

    Kept per process by (text, tokenizer files) digest: a benchmark that compiles and evaluates
    many variants of one model tokenizes its texts once.
    """
    import hashlib

    files = [model_dir / f for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")]
    digest = hashlib.sha1()
    for f in files:
        if f.is_file():
            digest.update(f.read_bytes())
    key = (hashlib.sha1(text.encode("utf-8")).hexdigest(), digest.hexdigest())
    if key not in _TOKEN_CACHE:
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            return None
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        ids.setflags(write=False)
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = ids
    return _TOKEN_CACHE[key]


def read_text(path: str, flag: str = "--calib", other: str = "'random' for random token ids") -> str:
    """A UTF-8 text file, a bundled text by name (``sotu-train``, ``sotu-test``) or a held-out one
    (``python-docs``, rptq_onnx/heldout.py); errors name ``flag`` (the option the user typed) and
    ``other`` (what else it accepts)."""
    held = heldout_text(path)
    if held is not None:
        return held
    p = text_path(path) or Path(path)
    if not p.is_file():
        raise RptqError(f"{flag} {path}: no such file; pass a UTF-8 text file, or {other}")
    raw = p.read_bytes()
    if b"\x00" in raw[:65536]:
        raise RptqError(f"{flag} {path}: looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RptqError(f"{flag} {path}: not valid UTF-8 text; convert it to UTF-8") from None
