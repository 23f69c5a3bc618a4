"""Calibration: draw token windows, stream them through ORT on the tapped graph, observe ranges.

Memory stays near plain inference: the tapped graph ends in per-sample [batch, channels]
reductions (see passes/insert_taps.py) and has no LM head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from rptq_onnx.anatomy import DecoderLayer
from rptq_onnx.bundled import text_path
from rptq_onnx.config import CalibConfig
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import save_model, weights_loaded
from rptq_onnx.observers import ChannelStats
from rptq_onnx.outdir import work_dir
from rptq_onnx.passes.insert_taps import HESSIAN_TAPS, Tap, insert_taps
from rptq_onnx.runtime import make_session


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
    """A UTF-8 text file, or a bundled text by name (``sotu-train``, ``sotu-test``); errors name ``flag``
    (the option the user typed) and ``other`` (what else it accepts)."""
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


def calibration_windows(calib: CalibConfig, model_dir: Path, vocab_size: int, max_positions: int | None) -> np.ndarray:
    """[nsamples, seqlen] int64 token windows, drawn with ``calib.seed``.

    From a text file: the whole text is tokenized and windows start at seeded random offsets (as
    the reference's loaders do). ``random``: seeded uniform token ids (smoke runs and tests only).
    """
    seqlen = calib.resolved_seqlen(max_positions)
    if max_positions is not None and seqlen > max_positions:
        raise RptqError(f"--seqlen {seqlen} exceeds the model's {max_positions} positions; use --seqlen ≤ {max_positions}")
    rng = np.random.default_rng(calib.seed)
    if calib.source == "random":
        return rng.integers(0, vocab_size, size=(calib.nsamples, seqlen), dtype=np.int64)
    text = read_text(calib.source)
    ids = token_ids(text, model_dir)
    if ids is None:
        raise RptqError(f"{model_dir}: no tokenizer beside the model, so --calib text cannot be tokenized; "
                        "export from a model directory with tokenizer files, or use --calib random")
    if len(ids) < seqlen + 1:
        raise RptqError(f"--calib {calib.source}: {len(ids)} tokens, shorter than one window of --seqlen {seqlen}; "
                        "use a longer text or a smaller --seqlen")
    starts = rng.integers(0, len(ids) - seqlen, size=calib.nsamples)
    return np.stack([ids[s:s + seqlen] for s in starts])


def position_ids(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last ``seq`` tokens from the mask, as Hugging Face derives them for left
    padding: count of attended tokens before each one, 1 on padding (masked anyway)."""
    pos = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    pos = np.where(attention_mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, -seq:])


def feeds_for(session, input_ids: np.ndarray, layers: list[DecoderLayer] | None = None) -> dict:
    """Inputs for a prefill of full windows: all-ones mask, positions 0.., empty past for with-past graphs.

    Past shapes come from the layer map when given, else from the session's input shapes
    ([batch, kv_heads, past, head_dim] float as ``export`` writes them, or [batch, channels, past]
    low-bit codes after the KV-cache pass, fed as an empty OrtValue).
    """
    b = input_ids.shape[0]
    feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    by_name = {}
    for layer in layers or []:
        by_name[layer.past_key] = by_name[layer.past_value] = (layer.num_kv_heads, layer.head_dim)
    for inp in session.get_inputs():
        if inp.name in feed:
            continue
        if inp.name == "position_ids":
            feed[inp.name] = position_ids(feed["attention_mask"], input_ids.shape[1])
            continue
        if inp.type != "tensor(float)" and len(inp.shape) == 3 and isinstance(inp.shape[1], int):
            feed[inp.name] = empty_cache(inp.type, b, inp.shape[1])
            continue
        dims = by_name.get(inp.name)
        if dims is None and len(inp.shape) == 4 and all(isinstance(d, int) for d in (inp.shape[1], inp.shape[3])):
            dims = (inp.shape[1], inp.shape[3])
        if dims is None:
            raise RptqError(f"the graph has an input '{inp.name}' that rptq-onnx does not know how to feed")
        if isinstance(inp.shape[3], int):  # fused attention's int8 / packed 4-bit cache: [B, kv_heads, T, D or D/2]
            dims = (dims[0], inp.shape[3])
        dtype = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8}.get(inp.type, np.float32)
        feed[inp.name] = np.zeros((b, dims[0], 0, dims[1]), dtype)
    return feed


def empty_cache(ort_type: str, batch: int, channels: int):
    """An empty low-bit past [batch, channels, 0] (an OrtValue: 4-bit types cannot cross NumPy)."""
    import onnxruntime as ort
    from onnx import TensorProto

    elem = {"tensor(uint4)": TensorProto.UINT4, "tensor(uint8)": TensorProto.UINT8}.get(ort_type)
    if elem is None:
        raise RptqError(f"a cache input of type {ort_type} is not one rptq-onnx writes")
    return ort.OrtValue.ortvalue_from_shape_and_type([batch, channels, 0], elem)


@dataclass
class Calibration:
    """Range statistics per (layer, tap) and, when asked for, XᵀX sums of linear inputs."""

    stats: dict[tuple[int, str], ChannelStats]
    xtx: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    tokens: int = 0

    def hessian(self, layer: int, tap: str) -> np.ndarray:
        """GPTQ's H = 2·XᵀX / tokens, in the original channel order."""
        return 2.0 * self.xtx[(layer, tap)] / max(self.tokens, 1)


def calibrate(model: onnx.ModelProto, layers: list[DecoderLayer], windows: np.ndarray, batch_size: int = 4,
              progress: bool = True, model_dir: Path | None = None, hessians: bool = False) -> Calibration:
    """Per-channel range statistics for every tap of every layer, keyed by (layer, tap name).

    ``model`` may be a skeleton loaded without its external weights (``model_dir`` is where
    they are): ONNX Runtime then reads the weights itself and Python never holds a copy.
    """
    tapped, taps = insert_taps(model, layers, hessians=hessians)
    stats = {(t.layer, t.name): ChannelStats() for t in taps}
    result = Calibration(stats={**stats, **{(t.layer, a): stats[(t.layer, t.name)] for t in taps for a in t.aliases}})
    xtx_taps = [t for t in taps if hessians and t.name in HESSIAN_TAPS]
    with work_dir("calib") as tmp:
        if weights_loaded(tapped):
            session = make_session(save_model(tapped, tmp / "tapped.onnx"))
        else:
            if model_dir is None:
                raise ValueError("a model without loaded weights needs model_dir")
            session = make_session(tapped.SerializeToString(), external_data_dir=model_dir)
        del tapped
        names = [o.name for o in session.get_outputs()]
        batches = range(0, len(windows), batch_size)
        for start in tqdm(batches, desc="calibrating", unit="batch", disable=not progress or None,
                          file=os.sys.stderr):
            batch = windows[start:start + batch_size]
            values = dict(zip(names, session.run(None, feeds_for(session, batch, layers))))
            for tap in taps:
                stats[(tap.layer, tap.name)].update(values[tap.output("max")], values[tap.output("min")])
            for tap in xtx_taps:
                key = (tap.layer, tap.name)
                add = values[tap.output("xtx")].astype(np.float64)
                result.xtx[key] = add if key not in result.xtx else result.xtx[key] + add
            result.tokens += int(batch.size)
            del values
        del session
    _check(taps, stats)
    return result


def _check(taps: list[Tap], stats: dict) -> None:
    for tap in taps:
        mx, mn = stats[(tap.layer, tap.name)].minmax.range()
        if mx.shape != (tap.channels,) or not (np.isfinite(mx).all() and np.isfinite(mn).all()):
            raise RptqError(f"layer {tap.layer}: calibration of {tap.name} produced non-finite or mis-shaped ranges")
