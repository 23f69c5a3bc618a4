"""Channel clustering: KMeans on per-channel (max, min) points → reorder index and cluster sizes."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import ThreadpoolController

from rptq_onnx.errors import RptqError


@dataclass(frozen=True)
class ClusterPlan:
    """``index[j]`` is the original channel placed at position j; ``counts`` are the sizes of the
    contiguous runs in that new order (per head for R2/R3).

    Normally each run is one cluster. With RoPE pairs (``plan_pair_clusters``) a cluster is two
    runs, one in each half of a head: ``run_clusters`` then gives the cluster id of every run.
    ``clustered`` is False for a point compile did not cluster (``identity``): original order, one
    cluster per head.
    """

    index: np.ndarray
    counts: tuple[int, ...]
    heads: int = 1
    run_clusters: tuple[int, ...] | None = None
    clustered: bool = True

    @classmethod
    def identity(cls, channels: int, heads: int = 1) -> ClusterPlan:
        """The plan of a point that is not clustered: channels in their order, one run per head."""
        return cls(index=np.arange(channels, dtype=np.int64), counts=(channels // heads,) * heads, heads=heads,
                   clustered=False)

    def __post_init__(self):
        if sum(self.counts) != len(self.index):
            raise ValueError(f"cluster runs cover {sum(self.counts)} channels, the index {len(self.index)}")
        if self.run_clusters is not None and len(self.run_clusters) != len(self.counts):
            raise ValueError(f"{len(self.run_clusters)} run cluster ids for {len(self.counts)} runs")

    @property
    def channels(self) -> int:
        return len(self.index)

    @property
    def num_clusters(self) -> int:
        return len(set(self.run_clusters)) if self.run_clusters is not None else len(self.counts)

    def cluster_sizes(self) -> list[int]:
        """Channels per cluster, in cluster-id order."""
        return np.bincount(self.folded_labels()).tolist()

    def folded_labels(self) -> np.ndarray:
        """Cluster id of every channel in the *reordered* order."""
        runs = np.arange(len(self.counts)) if self.run_clusters is None else np.asarray(self.run_clusters)
        return np.repeat(runs, self.counts)

    def labels(self) -> np.ndarray:
        """Cluster id of every channel in the *original* order (for per-channel QDQ parameters)."""
        ids = self.folded_labels()
        out = np.empty_like(ids)
        out[self.index] = ids
        return out

    def expand_heads(self, group: int) -> ClusterPlan:
        """The plan of K/V heads applied to query heads (GQA): query head h uses K/V head h // group.

        Every query head gets its own cluster ids (its own scales), with the K/V head's channel order.
        """
        if group == 1:
            return self
        per_head = self.channels // self.heads
        # a head's runs: KMeans may find fewer clusters in one head than in another (empty ones are dropped)
        run_head = (np.cumsum(self.counts) - np.asarray(self.counts)) // per_head
        run_ids = np.arange(len(self.counts)) if self.run_clusters is None else np.asarray(self.run_clusters)
        index, counts, run_clusters, next_id = [], [], [], 0
        for h in range(self.heads * group):
            g = h // group
            index.append(self.index[g * per_head:(g + 1) * per_head] - g * per_head + h * per_head)
            counts.extend(c for c, head in zip(self.counts, run_head) if head == g)
            ids = run_ids[run_head == g]
            run_clusters.extend((ids - ids.min() + next_id).tolist())
            next_id += int(ids.max() - ids.min()) + 1
        return ClusterPlan(index=np.concatenate(index), counts=tuple(counts), heads=self.heads * group,
                           run_clusters=None if self.run_clusters is None else tuple(run_clusters),
                           clustered=self.clustered)

    def to_dict(self) -> dict:
        d = {"index": self.index.tolist(), "counts": list(self.counts), "heads": self.heads}
        if self.run_clusters is not None:
            d["run_clusters"] = list(self.run_clusters)
        if not self.clustered:
            d["clustered"] = False
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClusterPlan:
        runs = d.get("run_clusters")
        return cls(index=np.asarray(d["index"], dtype=np.int64), counts=tuple(d["counts"]), heads=d.get("heads", 1),
                   run_clusters=tuple(runs) if runs is not None else None, clustered=d.get("clustered", True))


@lru_cache(maxsize=1)
def _thread_pools() -> ThreadpoolController:
    # found once (13 ms); sklearn's OpenMP runtime and the BLAS libraries are loaded by the imports above
    return ThreadpoolController()


@contextmanager
def one_thread():
    """OpenMP and BLAS limited to one thread in this block (restored after).

    Every fit here is tiny (at most a few thousand 2–16-dimensional points), so thread teams only
    add wake-ups and spin-waiting: with 2 OpenMP threads on 2 busy cores a 64-point fit took
    160 ms instead of 10 ms (``tools/bench_clustering.py``). One thread also makes the result
    independent of the core count: sklearn's threaded Lloyd step adds per-thread partial sums.
    """
    with _thread_pools().limit(limits=1):
        yield


def _kmeans_labels(data: np.ndarray, k: int) -> np.ndarray:
    n = data.shape[0]
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n)
    with one_thread():
        return KMeans(n_clusters=k, n_init=10, random_state=0).fit(data).labels_


def _split_heads(features: np.ndarray, k: int, heads: int, where: str, unit: str = "channels") -> int:
    channels = features.shape[0]
    if channels % heads:
        raise RptqError(f"{where}: {channels} channels do not split into {heads} heads")
    per_head = channels // heads
    limit = per_head if unit == "channels" else per_head // 2
    if k > limit:
        scope = f"per head ({limit} {unit} each)" if heads > 1 else f"({limit} {unit})"
        raise RptqError(f"{where}: {k} clusters is more than the {unit} {scope}; lower --clusters for this point")
    return per_head


def _as_2d(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features[:, None] if features.ndim == 1 else features


def plan_clusters(features: np.ndarray, k: int, heads: int = 1, where: str = "") -> ClusterPlan:
    """Cluster ``features`` [channels, F] (e.g. columns max, min) into ``k`` groups per head.

    Per head: ``KMeans(n_clusters=k, n_init=10, random_state=0)``; index = stable argsort of
    the labels, offset by the head's first channel. Deterministic for the same inputs.
    """
    features = _as_2d(features)
    per_head = _split_heads(features, k, heads, where)
    index, counts = [], []
    for h in range(heads):
        labels = _kmeans_labels(features[h * per_head:(h + 1) * per_head], k)
        order = np.argsort(labels, kind="stable")
        index.append(order + h * per_head)
        counts.extend(int(c) for c in np.bincount(labels, minlength=k) if c > 0)
    return ClusterPlan(index=np.concatenate(index).astype(np.int64), counts=tuple(counts), heads=heads)


def plan_pair_clusters(features: np.ndarray, k: int, heads: int, where: str = "") -> ClusterPlan:
    """Like ``plan_clusters``, but channels i and i + D/2 of each head (a RoPE pair) stay together.

    Each pair is one KMeans point (the features of both channels side by side). The reordered head
    keeps RoPE's halves: [pairs' first channels by cluster | the same pairs' second channels], so
    every cluster is two runs and ``rotate_half`` still pairs position j with j + D/2.
    """
    features = _as_2d(features)
    per_head = _split_heads(features, k, heads, where, unit="RoPE pairs")
    half = per_head // 2
    index, counts, run_clusters = [], [], []
    for h in range(heads):
        block = features[h * per_head:(h + 1) * per_head]
        labels = _kmeans_labels(np.concatenate([block[:half], block[half:]], axis=1), k)
        order = np.argsort(labels, kind="stable")
        index.append(np.concatenate([order, order + half]) + h * per_head)
        sizes = [int(c) for c in np.bincount(labels, minlength=k) if c > 0]
        ids = list(range(len(run_clusters) // 2, len(run_clusters) // 2 + len(sizes)))  # dense ids over heads
        counts.extend(sizes * 2)
        run_clusters.extend(ids * 2)
    return ClusterPlan(index=np.concatenate(index).astype(np.int64), counts=tuple(counts), heads=heads,
                       run_clusters=tuple(run_clusters))


def range_features(*ranges: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Feature columns [max₁, max₂, …, min₁, min₂, …] as the reference orders them for R2."""
    maxes = [r[0] for r in ranges]
    mins = [r[1] for r in ranges]
    return np.stack(maxes + mins, axis=1)


def group_features(values: np.ndarray, heads: int, group: int) -> np.ndarray:
    """Per K/V-head channel features from a query-head tensor's per-channel ``values`` [heads·group·D]:
    the values of the ``group`` query heads that share each K/V head, side by side → [heads·D, group]."""
    v = np.asarray(values).reshape(heads, group, -1)  # [kv head, query head in group, channel]
    return v.transpose(0, 2, 1).reshape(-1, group)
