"""Channel clustering: KMeans on per-channel (max, min) points → reorder index and cluster sizes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from rptq_onnx.errors import RptqError


@dataclass(frozen=True)
class ClusterPlan:
    """``index[j]`` is the original channel placed at position j; ``counts`` are the cluster
    sizes in that new order (contiguous runs, per head for R2/R3)."""

    index: np.ndarray
    counts: tuple[int, ...]
    heads: int = 1

    def __post_init__(self):
        assert sum(self.counts) == len(self.index)

    @property
    def channels(self) -> int:
        return len(self.index)

    def labels(self) -> np.ndarray:
        """Cluster id of every channel in the *original* order (for per-channel QDQ parameters)."""
        ids = np.repeat(np.arange(len(self.counts)), self.counts)
        out = np.empty_like(ids)
        out[self.index] = ids
        return out

    def to_dict(self) -> dict:
        return {"index": self.index.tolist(), "counts": list(self.counts), "heads": self.heads}

    @classmethod
    def from_dict(cls, d: dict) -> ClusterPlan:
        return cls(index=np.asarray(d["index"], dtype=np.int64), counts=tuple(d["counts"]), heads=d.get("heads", 1))


def plan_clusters(features: np.ndarray, k: int, heads: int = 1, where: str = "") -> ClusterPlan:
    """Cluster ``features`` [channels, F] (e.g. columns max, min) into ``k`` groups per head.

    Per head: ``KMeans(n_clusters=k, n_init=10, random_state=0)``; index = stable argsort of
    the labels, offset by the head's first channel. Deterministic for the same inputs.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 1:
        features = features[:, None]
    channels = features.shape[0]
    if channels % heads:
        raise RptqError(f"{where}: {channels} channels do not split into {heads} heads")
    per_head = channels // heads
    if k > per_head:
        scope = f"per head ({per_head} channels each)" if heads > 1 else f"({per_head} channels)"
        raise RptqError(f"{where}: {k} clusters is more than the channels {scope}; lower --clusters for this point")
    index, counts = [], []
    for h in range(heads):
        data = features[h * per_head:(h + 1) * per_head]
        if k == 1:
            labels = np.zeros(per_head, dtype=np.int64)
        elif k == per_head:
            labels = np.arange(per_head)
        else:
            labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit(data).labels_
        order = np.argsort(labels, kind="stable")
        index.append(order + h * per_head)
        counts.extend(int(c) for c in np.bincount(labels, minlength=k) if c > 0)
    return ClusterPlan(index=np.concatenate(index).astype(np.int64), counts=tuple(counts), heads=heads)


def range_features(*ranges: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Feature columns [max₁, max₂, …, min₁, min₂, …] as the reference orders them for R2."""
    maxes = [r[0] for r in ranges]
    mins = [r[1] for r in ranges]
    return np.stack(maxes + mins, axis=1)
