"""Per-cluster clipping chosen on calibration tokens (``--observer mse``).

A cluster's min/max covers the largest values calibration saw; at 4 bits that leaves most values a
few steps wide. For each cluster this tries the min/max shrunk by every factor of
``observers.SHRINKS`` and keeps the one whose Q/DQ (the point's own grid: asymmetric, or symmetric
for fused K) has the least squared error on the tokens calibration sampled at that point
(``passes/insert_taps.py``, every ``observers.SAMPLE_EVERY``-th token of each window).
"""

from __future__ import annotations

import numpy as np

from rptq_onnx.observers import SHRINKS
from rptq_onnx.quant import fake_quant


def searched_range(sample: np.ndarray, ch_max: np.ndarray, ch_min: np.ndarray, labels: np.ndarray, bits: int,
                   grid) -> tuple[np.ndarray, np.ndarray]:
    """(max, min) per channel, each cluster's shrunk by its best factor; ``sample`` [tokens, C] and ``labels`` in the
    same channel order as the ranges; ``grid(max, min, labels, bits)`` makes the point's QParams."""
    k = int(labels.max()) + 1
    best, factor = np.full(k, np.inf), np.ones(k)
    x = np.asarray(sample, np.float32)
    for s in SHRINKS:
        _, deq = fake_quant(x, grid(ch_max * s, ch_min * s, labels, bits))
        err = np.bincount(labels, ((deq - x).astype(np.float64) ** 2).sum(axis=0), minlength=k)
        better = err < best
        best[better], factor[better] = err[better], s
    return ch_max * factor[labels], ch_min * factor[labels]
