"""NumPy observers of per-channel activation ranges, fed with per-sample tap outputs.

Taps hand over one row per calibration sample: ``sample_max``/``sample_min`` of shape
[samples, channels]. Observers never see full activations, so their memory is O(channels).
"""

from __future__ import annotations

import numpy as np


class MinMaxObserver:
    """Running per-channel max and min over every sample seen (what RPTQ clusters on)."""

    def __init__(self):
        self.max: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.samples = 0

    def update(self, sample_max: np.ndarray, sample_min: np.ndarray) -> None:
        bmax, bmin = np.max(sample_max, axis=0), np.min(sample_min, axis=0)
        if self.max is None:
            self.max, self.min = bmax.astype(np.float64), bmin.astype(np.float64)
        else:
            np.maximum(self.max, bmax, out=self.max)
            np.minimum(self.min, bmin, out=self.min)
        self.samples += len(sample_max)

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        out = MinMaxObserver()
        parts = [o for o in (self, other) if o.max is not None]
        if parts:
            out.max = np.max([o.max for o in parts], axis=0)
            out.min = np.min([o.min for o in parts], axis=0)
            out.samples = sum(o.samples for o in parts)
        return out

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.max is None:
            raise ValueError("observer has seen no samples")
        return self.max, self.min


class EmaMinMaxObserver:
    """The reference's "ema_minmax": per sample, range ← 0.99·range + 0.01·sample range.

    The first sample initialises the range. Order-dependent, so it has no ``merge``.
    """

    def __init__(self, momentum: float = 0.99):
        self.momentum = momentum
        self.max: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.samples = 0

    def update(self, sample_max: np.ndarray, sample_min: np.ndarray) -> None:
        m = self.momentum
        for smax, smin in zip(sample_max.astype(np.float64), sample_min.astype(np.float64)):
            if self.max is None:
                self.max, self.min = smax.copy(), smin.copy()
            else:
                self.max = m * self.max + (1 - m) * smax
                self.min = m * self.min + (1 - m) * smin
            self.samples += 1

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.max is None:
            raise ValueError("observer has seen no samples")
        return self.max, self.min


class ChannelStats:
    """Both observers for one tapped tensor."""

    def __init__(self):
        self.minmax = MinMaxObserver()
        self.ema = EmaMinMaxObserver()

    def update(self, sample_max: np.ndarray, sample_min: np.ndarray) -> None:
        self.minmax.update(sample_max, sample_min)
        self.ema.update(sample_max, sample_min)
