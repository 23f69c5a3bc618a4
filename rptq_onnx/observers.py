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


class MeanObserver:
    """Per channel, the mean over samples of each sample's max and min: the range a window of text is
    expected to reach, every calibration window weighing the same (the EMA above gives the first
    window most of the weight: 0.99^31 ≈ 73 % after 32 samples)."""

    def __init__(self):
        self.sum_max: np.ndarray | None = None
        self.sum_min: np.ndarray | None = None
        self.samples = 0

    def update(self, sample_max: np.ndarray, sample_min: np.ndarray) -> None:
        bmax, bmin = sample_max.astype(np.float64).sum(axis=0), sample_min.astype(np.float64).sum(axis=0)
        if self.sum_max is None:
            self.sum_max, self.sum_min = bmax, bmin
        else:
            self.sum_max += bmax
            self.sum_min += bmin
        self.samples += len(sample_max)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.sum_max is None:
            raise ValueError("observer has seen no samples")
        return self.sum_max / self.samples, self.sum_min / self.samples


MAX_SAMPLE_ROWS = 4096  # tokens kept per tap for a range search (32 windows of 512, every 4th: 4,096)


class ChannelStats:
    """Every observer for one tapped tensor, and (when calibration samples tokens) a sample of its values."""

    def __init__(self):
        self.minmax = MinMaxObserver()
        self.ema = EmaMinMaxObserver()
        self.mean = MeanObserver()
        self._rows: list[np.ndarray] = []

    def add_sample(self, rows: np.ndarray) -> None:
        """Tokens × channels, kept up to MAX_SAMPLE_ROWS in all."""
        room = MAX_SAMPLE_ROWS - sum(len(r) for r in self._rows)
        if room > 0:
            self._rows.append(np.asarray(rows[:room], np.float32))

    def drop_sample(self) -> None:
        self._rows = []

    @property
    def sample(self) -> np.ndarray | None:
        return np.concatenate(self._rows) if self._rows else None

    def update(self, sample_max: np.ndarray, sample_min: np.ndarray) -> None:
        self.minmax.update(sample_max, sample_min)
        self.ema.update(sample_max, sample_min)
        self.mean.update(sample_max, sample_min)

    def observer(self, name: str):
        """The observer called ``name`` (config.OBSERVERS)."""
        return {"ema": self.ema, "minmax": self.minmax, "mean": self.mean}[name]


# ``mse``: each cluster's min/max shrunk by the factor of this grid whose Q/DQ has the least squared error on the
# calibration tokens sampled at that point (rptq_onnx/range_search.py)
SHRINKS = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.0 … 0.3
SAMPLE_EVERY = 4  # calibration keeps every 4th token of each window at a searched point


WIDE_BITS = 8  # ``auto``: from this width up a point takes the plain min/max, widened by WIDE_MARGIN
WIDE_MARGIN = 1.5


def searched(name: str) -> bool:
    """Do the points under ``--observer name`` get their clusters' clipping searched (``SHRINKS``)?"""
    return name == "mse"


def observer_for(name: str, bits: int, kv_cache: bool = False) -> tuple[str, float]:
    """(observer, factor on its range) for a point quantized to ``bits`` under ``--observer name``; for a
    searched point (``searched``) the range the search starts from. ``kv_cache``: K or V of a KV preset.

    ``auto``: at 8 bits and above, where rounding costs little and clipping costs much, the calibration
    min/max widened by half: unseen text goes beyond the extremes of the calibration windows (SmolLM2
    W16A8, first 16,384 tokens: EMA +8.0 % over FP on sotu-test and +19.8 % on held-out python-docs,
    min/max +5.7 % / +10.3 %, min/max × 1.5 +2.6 % / +5.2 %). Below 8 bits, the
    mean of the windows' ranges, where a tighter range's finer grid pays, and which unlike the EMA does
    not depend on the order of the windows (W16A4: mean +99 % / +138 %, auto +94 % / +130 %, EMA +123 % / +155 %).
    ``mse`` searches each cluster's clipping on sampled calibration tokens (rptq_onnx/range_search.py);
    not the default: on held-out text it lost to the mean (README, *Quality on SmolLM2*). The K/V of the KV
    presets (``kv_cache``) take the EMA: on held-out python-docs it beat the mean at 4 and at 3 bits
    (SmolLM2, first 16,384 tokens, sotu-test / python-docs: KV4 24.85 / 17.19 against 24.88 / 17.35,
    KV3 31.14 / 22.38 against 31.01 / 22.52)."""
    if searched(name):
        return "minmax", 1.0  # the range searched from
    if name != "auto":
        return name, 1.0
    if kv_cache:
        return "ema", 1.0
    return ("minmax", WIDE_MARGIN) if bits >= WIDE_BITS else ("mean", 1.0)
