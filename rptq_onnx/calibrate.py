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
from rptq_onnx.config import CalibConfig
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import save_model, weights_loaded
from rptq_onnx.observers import ChannelStats
from rptq_onnx.outdir import work_dir
from rptq_onnx.passes.insert_taps import Tap, insert_taps
from rptq_onnx.runtime import feeds_for, make_session
from rptq_onnx.text import read_text, token_ids
from rptq_onnx.vocabulary import HESSIAN_TAPS


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
