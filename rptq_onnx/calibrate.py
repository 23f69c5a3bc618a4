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
from rptq_onnx.runtime import feeds_for, make_session, run_into
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
    """Range statistics per (layer, tap) and, when asked for, XᵀX sums of linear inputs (float32)."""

    stats: dict[tuple[int, str], ChannelStats]
    xtx: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    skipped_first: frozenset[str] = frozenset()  # the taps whose ranges leave out each window's first token
    head_xtx: np.ndarray | None = None  # XᵀX of the LM head's input (float64), when asked for (a 4-bit head's GPTQ)

    def hessian(self, layer: int, tap: str, spend: bool = False) -> np.ndarray:
        """GPTQ's H = 2·XᵀX / tokens in float32, in the original channel order: a fresh array, or with
        ``spend`` the sums themselves, scaled in place and taken out of ``xtx`` (no copy: 1 GiB for 16,384 inputs)."""
        scale = np.float32(2.0 / max(self.tokens, 1))
        if not spend:
            return self.xtx[(layer, tap)] * scale
        h = self.xtx.pop((layer, tap))
        h *= scale
        return h


    def head_hessian(self) -> np.ndarray | None:
        """GPTQ's H = 2·XᵀX / tokens of the LM head's input (float32), or None where it was not gathered."""
        return None if self.head_xtx is None else (self.head_xtx * (2.0 / max(self.tokens, 1))).astype(np.float32)

    def absorb_head(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        add = x.T @ x
        self.head_xtx = add if self.head_xtx is None else self.head_xtx + add


def calibrate(model: onnx.ModelProto, layers: list[DecoderLayer], windows: np.ndarray, batch_size: int = 4,
              progress: bool = True, model_dir: Path | None = None, hessians: bool = False,
              sample_taps: frozenset[str] = frozenset(), skip_first: frozenset[str] = frozenset(),
              head_input: str | None = None) -> Calibration:
    """Per-channel range statistics for every tap of every layer, keyed by (layer, tap name).

    ``model`` may be a skeleton loaded without its external weights (``model_dir`` is where
    they are): ONNX Runtime then reads the weights itself and Python never holds a copy. The session
    runs as the layer-wise compile's do (no arena, no prepacked weights), so both give the same numbers.
    ``sample_taps``: also keep every ``observers.SAMPLE_EVERY``-th token at those taps (``ChannelStats.sample``).
    ``skip_first``: those taps leave out each window's first token (``--first-token float``).
    ``head_input``: also sum XᵀX of this tensor, the LM head's input (``Calibration.head_hessian``).
    """
    tapped, taps = insert_taps(model, layers, hessians=hessians, sample_taps=sample_taps, skip_first=skip_first,
                               keep=(head_input,) if head_input else ())
    result = _empty_result(taps, skip_first)
    with work_dir("calib") as tmp:
        if weights_loaded(tapped):
            session = make_session(save_model(tapped, tmp / "tapped.onnx"), arena=False)
        else:
            if model_dir is None:
                raise ValueError("a model without loaded weights needs model_dir")
            session = make_session(tapped.SerializeToString(), external_data_dir=model_dir, arena=False)
        del tapped
        names = [o.name for o in session.get_outputs()]
        batches = range(0, len(windows), batch_size)
        into = _xtx_buffers(taps, hessians)
        for start in tqdm(batches, desc="calibrating", unit="batch", disable=not progress or None,
                          file=os.sys.stderr):
            batch = windows[start:start + batch_size]
            values = dict(zip(names, run_into(session, names, feeds_for(session, batch, layers), into)))
            _absorb(result, taps, values, hessians)
            if head_input:
                result.absorb_head(values[head_input])
            result.tokens += int(batch.size)
            del values
        del session
    _check(taps, result.stats)
    return result


def _empty_result(taps: list[Tap], skip_first: frozenset[str] = frozenset()) -> Calibration:
    stats = {(t.layer, t.name): ChannelStats() for t in taps}
    return Calibration(stats={**stats, **{(t.layer, a): stats[(t.layer, t.name)] for t in taps for a in t.aliases}},
                       skipped_first=frozenset(skip_first))


def _absorb(result: Calibration, taps: list[Tap], values: dict[str, np.ndarray], hessians: bool) -> None:
    """One batch's tap outputs into the observers (and the XᵀX sums)."""
    for tap in taps:
        stats = result.stats[(tap.layer, tap.name)]
        stats.update(values[tap.output("max")], values[tap.output("min")])
        if tap.output("sample") in values:
            stats.add_sample(values[tap.output("sample")].reshape(-1, tap.channels))
        if hessians and tap.name in HESSIAN_TAPS:
            key = (tap.layer, tap.name)
            add = values[tap.output("xtx")]
            if key in result.xtx:  # summed in float32 in place, as the reference: [C, C] is large (268 MB for C = 8192)
                np.add(result.xtx[key], add, out=result.xtx[key])
            else:
                result.xtx[key] = add.copy()


def _xtx_buffers(taps: list[Tap], hessians: bool) -> dict[str, np.ndarray]:
    """One [C, C] float32 array per XᵀX output, which every batch's run writes into (``runtime.run_into``)."""
    return {tap.output("xtx"): np.empty((tap.channels, tap.channels), np.float32)
            for tap in taps if hessians and tap.name in HESSIAN_TAPS}


def tap_outputs(taps: list[Tap], hessians: bool, outputs: set[str] | frozenset = frozenset()) -> list[str]:
    """The tapped graph's outputs for ``taps``: max/min, XᵀX where asked for, samples where ``outputs`` has them."""
    return [tap.output(stat) for tap in taps for stat in ("max", "min", "xtx", "sample")
            if stat in ("max", "min") or (stat == "xtx" and hessians and tap.name in HESSIAN_TAPS)
            or (stat == "sample" and tap.output(stat) in outputs)]


class LayerwiseCalibration:
    """Calibration one decoder layer at a time (rptq_onnx/layerwise.py): ``layer(i)`` observes layer i
    on the stream it is given and returns the float stream leaving it; the caller hands on that
    stream or another (the quantized layer's) with ``stream.advance``. Statistics accumulate in
    ``result``; a layer's XᵀX sums can be dropped once its weights are quantized."""

    def __init__(self, model: onnx.ModelProto, layers: list[DecoderLayer], windows: np.ndarray, batch_size: int,
                 model_dir: Path | None, hessians: bool = False, sample_taps: frozenset[str] = frozenset(),
                 skip_first: frozenset[str] = frozenset(), head_input: str | None = None):
        from rptq_onnx.layerwise import LayerStream, find_cut

        self.layers, self.hessians, self.model_dir = layers, hessians, model_dir
        self.tapped, self.taps = insert_taps(model, layers, hessians=hessians, sample_taps=sample_taps,
                                             skip_first=skip_first, keep=(head_input,) if head_input else ())
        self.outputs = frozenset(o.name for o in self.tapped.graph.output)
        self.cut = find_cut(model, layers)
        self.stream = LayerStream(model, layers, self.cut, windows, batch_size, model_dir)
        self.result = _empty_result(self.taps, skip_first)
        self.result.tokens = int(windows.size)
        self.head_input = head_input  # observed with the last layer (its model computes it from that layer's stream)

    def layer(self, i: int, keep_input: bool = True) -> list[np.ndarray]:
        """Observe layer ``i``; returns the float stream leaving it. ``keep_input=False``: that stream replaces
        the one entering the layer batch by batch (one stream in memory, not two)."""
        if self.stream.layer != i:
            raise ValueError(f"the stream is at layer {self.stream.layer}, not {i}")
        taps = [t for t in self.taps if t.layer == i]
        last = i == len(self.layers) - 1
        wanted = tap_outputs(taps, self.hessians, self.outputs) + ([] if last else [self.cut.outputs[i]])
        wanted += [self.head_input] if last and self.head_input else []
        out = self.stream.stream if not keep_input else []
        for b, (_, values) in enumerate(self.stream.run(self.tapped, wanted, into=_xtx_buffers(taps, self.hessians))):
            _absorb(self.result, taps, values, self.hessians)
            if last and self.head_input:
                self.result.absorb_head(values[self.head_input])
            if not last and keep_input:
                out.append(values[self.cut.outputs[i]])
            elif not last:
                out[b] = values[self.cut.outputs[i]]  # batch b's input is spent
        _check(taps, self.result.stats)
        return out


def calibrate_layerwise(model: onnx.ModelProto, layers: list[DecoderLayer], windows: np.ndarray, batch_size: int = 4,
                        model_dir: Path | None = None, hessians: bool = False) -> Calibration:
    """``calibrate``'s statistics computed one layer at a time, each layer fed the float outputs of the one
    before: the same numbers (up to float rounding across ONNX Runtime's fusions) at one layer's memory."""
    run = LayerwiseCalibration(model, layers, windows, batch_size, model_dir, hessians)
    for i in range(len(layers)):
        run.stream.advance(run.layer(i, keep_input=False))
    return run.result


def _check(taps: list[Tap], stats: dict) -> None:
    for tap in taps:
        mx, mn = stats[(tap.layer, tap.name)].minmax.range()
        if mx.shape != (tap.channels,) or not (np.isfinite(mx).all() and np.isfinite(mn).all()):
            raise RptqError(f"layer {tap.layer}: calibration of {tap.name} produced non-finite or mis-shaped ranges")
