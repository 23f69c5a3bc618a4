"""Observers and KMeans channel clustering agree with direct computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from rptq_onnx import RptqError
from rptq_onnx.clustering import ClusterPlan, plan_clusters, range_features
from rptq_onnx.config import ClusterCounts
from rptq_onnx.observers import (ChannelStats, EmaMinMaxObserver, MeanObserver, MinMaxObserver, observer_for,
                                 searched)


def test_minmax_observer_tracks_extremes_and_merges():
    rng = np.random.default_rng(0)
    rows_max, rows_min = rng.normal(size=(10, 6)), rng.normal(size=(10, 6)) - 3
    a, b = MinMaxObserver(), MinMaxObserver()
    a.update(rows_max[:4], rows_min[:4])
    b.update(rows_max[4:], rows_min[4:])
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.max, rows_max.max(0))
    np.testing.assert_array_equal(merged.min, rows_min.min(0))
    assert merged.samples == 10


def test_ema_observer_follows_the_reference_rule():
    rows = np.array([[1.0, -1.0], [3.0, 5.0], [2.0, 0.0]])
    obs = EmaMinMaxObserver()
    obs.update(rows, -rows)  # batched update = sample by sample
    expect = rows[0]
    for r in rows[1:]:
        expect = 0.99 * expect + 0.01 * r
    np.testing.assert_allclose(obs.max, expect)
    np.testing.assert_allclose(obs.min, -expect)


def test_mean_observer_weighs_every_sample_alike():
    rng = np.random.default_rng(3)
    rows_max, rows_min = rng.normal(size=(7, 5)) + 4, rng.normal(size=(7, 5)) - 4
    obs = MeanObserver()
    obs.update(rows_max[:3], rows_min[:3])
    obs.update(rows_max[3:], rows_min[3:])
    mx, mn = obs.range()
    np.testing.assert_allclose(mx, rows_max.mean(0))
    np.testing.assert_allclose(mn, rows_min.mean(0))
    # inside the extremes, and unlike the EMA not tied to the first sample
    assert np.all(mx <= rows_max.max(0)) and np.all(mn >= rows_min.min(0))
    # the samples in reverse order: the same mean, another EMA (which the first sample dominates)
    forward, backward = ChannelStats(), ChannelStats()
    forward.update(rows_max, rows_min)
    backward.update(rows_max[::-1], rows_min[::-1])
    np.testing.assert_allclose(backward.observer("mean").range()[0], mx)
    assert not np.allclose(backward.observer("ema").range()[0], forward.observer("ema").range()[0])


def test_auto_observer_by_bits():
    assert [observer_for("auto", b) for b in (3, 4, 7, 8, 16)] == [("mean", 1.0)] * 3 + [("minmax", 1.5)] * 2
    assert [observer_for("auto", b, kv_cache=True) for b in (3, 4, 8)] == [("ema", 1.0)] * 3  # a KV preset's K/V
    assert observer_for("mean", 4, kv_cache=True) == ("mean", 1.0)  # an observer asked for is kept
    assert searched("mse") and observer_for("mse", 4) == ("minmax", 1.0)
    assert not any(searched(name) for name in ("auto", "mean", "minmax", "ema"))
    assert observer_for("mean", 8) == ("mean", 1.0) and observer_for("ema", 8) == ("ema", 1.0)


def test_range_search_clips_rare_extremes_and_keeps_even_clusters():
    from rptq_onnx.quant import activation_qparams, fake_quant
    from rptq_onnx.range_search import searched_range

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 8)).astype(np.float32)
    x[:4, :4] *= 40  # cluster 0 (channels 0-3): heavy tails, a few huge values; cluster 1: uniform in [-1, 1]
    x[:, 4:] = rng.uniform(-1, 1, size=(2048, 4))
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mx, mn = x.max(0), x.min(0)
    smx, smn = searched_range(x, mx, mn, labels, 4, activation_qparams)
    assert (smx[:4] < 0.5 * mx[:4]).all() and np.allclose(smx[4:], mx[4:]) and np.allclose(smn[4:], mn[4:])

    def err(a, b):
        return float(((fake_quant(x, activation_qparams(a, b, labels, 4))[1] - x) ** 2).sum())
    assert err(smx, smn) < err(mx, mn)


def _sklearn_plan(data, k):
    labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit(data).labels_
    return np.argsort(labels, kind="stable"), np.bincount(labels, minlength=k)


def test_plan_matches_direct_sklearn_and_is_deterministic():
    rng = np.random.default_rng(1)
    mx = np.abs(rng.lognormal(size=96))
    mn = -np.abs(rng.lognormal(size=96))
    feats = range_features((mx, mn))
    plan = plan_clusters(feats, 8)
    index, counts = _sklearn_plan(np.stack([mx, mn], 1), 8)
    np.testing.assert_array_equal(plan.index, index)
    assert plan.counts == tuple(int(c) for c in counts if c)
    again = plan_clusters(feats, 8)
    np.testing.assert_array_equal(plan.index, again.index)
    # each cluster is contiguous in the new order
    labels = plan.labels()
    assert np.all(np.diff(labels[plan.index]) >= 0)


def test_per_head_plan_with_shared_q_k_features():
    rng = np.random.default_rng(2)
    heads, d = 3, 16
    qmax, kmax = rng.normal(size=heads * d) + 2, rng.normal(size=heads * d) + 2
    qmin, kmin = -qmax - 1, -kmax - 1
    feats = range_features((qmax, qmin), (kmax, kmin))
    assert feats.shape == (heads * d, 4)
    np.testing.assert_array_equal(feats[:, 0], qmax)
    np.testing.assert_array_equal(feats[:, 1], kmax)
    plan = plan_clusters(feats, 4, heads=heads)
    for h in range(heads):
        part = plan.index[h * d:(h + 1) * d]
        assert sorted(part) == list(range(h * d, (h + 1) * d))  # stays inside its head
        index, _ = _sklearn_plan(feats[h * d:(h + 1) * d], 4)
        np.testing.assert_array_equal(part, index + h * d)
    assert sum(plan.counts) == heads * d and plan.heads == heads


def test_plan_round_trip_and_edge_counts():
    feats = np.stack([np.arange(8.0), -np.arange(8.0)], 1)
    assert plan_clusters(feats, 1).counts == (8,)
    assert plan_clusters(feats, 8).counts == (1,) * 8
    plan = plan_clusters(feats, 3)
    back = ClusterPlan.from_dict(plan.to_dict())
    np.testing.assert_array_equal(back.index, plan.index)
    assert back.counts == plan.counts


def test_too_many_clusters_is_an_error():
    with pytest.raises(RptqError, match="more than the channels"):
        plan_clusters(np.zeros((16, 2)), 5, heads=4, where="layer 0 R2")


@pytest.mark.parametrize("text,match", [("R1=0", "at least 1"), ("R7=4", "not POINT=K"), ("R1", "not POINT=K"),
                                        ("R2=x", "not an integer")])
def test_cluster_counts_parse_errors(text, match):
    with pytest.raises(RptqError, match=match):
        ClusterCounts.parse(text)


def test_cluster_counts_parse():
    assert ClusterCounts.parse("R1=16,R5=8") == ClusterCounts(R1=16, R5=8)
    assert ClusterCounts.parse("all=1") == ClusterCounts(1, 1, 1, 1, 1)
    assert str(ClusterCounts()) == "R1=32,R2=4,R3=4,R4=32,R5=32"


def test_cluster_specs_are_typed_and_written_as_words():
    """ch / tensor are words in the config JSON (report.json, the stamped config); 0 / −1 from older
    outputs still load; the KMeans k and the per-tensor points are decoded by ClusterCounts alone."""
    import json

    from rptq_onnx.config import CompileConfig

    c = ClusterCounts.parse("all=tensor,R1=ch,R5=8")
    assert c == ClusterCounts(R1="ch", R2="tensor", R3="tensor", R4="tensor", R5=8)
    config = CompileConfig(clusters=c)
    assert json.loads(config.to_json())["clusters"] == {"R1": "ch", "R2": "tensor", "R3": "tensor", "R4": "tensor",
                                                        "R5": 8}
    assert CompileConfig.from_json(config.to_json()) == config
    old = json.loads(config.to_json())
    old["clusters"] = {"R1": 0, "R2": -1, "R3": -1, "R4": -1, "R5": 8}
    assert CompileConfig.from_json(json.dumps(old)) == config
    assert c.kmeans_k() == {"R1": None, "R2": 1, "R3": 1, "R4": 1, "R5": 8}
    assert c.per_tensor_points() == {"R2", "R3", "R4"}
    for bad in (0, -1, True, "all", 2.0):
        with pytest.raises(RptqError, match="count ≥ 1"):
            ClusterCounts(R1=bad)


def test_inspect_reads_old_cluster_specs():
    """A model compiled before the specs were typed: its stamped 0 / −1 read as ch / tensor."""
    import json

    import onnx

    from rptq_onnx.inspection import _compile_config, _per_tensor_points

    model = onnx.ModelProto()
    prop = model.metadata_props.add()
    prop.key, prop.value = "rptq.config", json.dumps({"preset": "W4A4", "clusters": {"R1": 0, "R2": -1, "R3": 4,
                                                                                      "R4": 32, "R5": 32}})
    compiled = _compile_config(model)
    assert compiled["clusters"] == {"R1": "ch", "R2": "tensor", "R3": 4, "R4": 32, "R5": 32}
    assert _per_tensor_points(compiled) == {"R2"}


def test_fits_run_on_one_thread_with_the_same_plan_and_limits_restored():
    """The clustering fits run single-threaded (no spin-waiting OpenMP team on busy cores); the plan is
    the direct sklearn one, here with more points than one Lloyd chunk (256), and pools are restored."""
    from threadpoolctl import threadpool_info

    from rptq_onnx.clustering import one_thread

    rng = np.random.default_rng(3)
    mx, mn = rng.lognormal(size=700), -rng.lognormal(size=700)
    before = [p["num_threads"] for p in threadpool_info()]
    with one_thread():
        assert all(p["num_threads"] == 1 for p in threadpool_info())
        index, counts = _sklearn_plan(np.stack([mx, mn], 1), 16)
    assert [p["num_threads"] for p in threadpool_info()] == before
    plan = plan_clusters(range_features((mx, mn)), 16)
    np.testing.assert_array_equal(plan.index, index)
    assert plan.counts == tuple(int(c) for c in counts if c)
