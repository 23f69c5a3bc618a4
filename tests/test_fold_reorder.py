"""Reorder folding is FP-exact: reordered graphs compute the original logits (ORT_ENABLE_ALL)."""

from __future__ import annotations

import numpy as np
import pytest

from rptq_onnx.anatomy import find_layers
from rptq_onnx.clustering import plan_clusters
from rptq_onnx.compile import compile_graph
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig
from rptq_onnx.export import to_onnx
from rptq_onnx.graph import GraphIndex, load_model
from rptq_onnx.models import random_opt
from rptq_onnx.passes.fold_reorder import fold_reorder
from rptq_onnx.runtime import make_session

pytestmark = pytest.mark.slow  # every test here exports or compiles a model


def _run(model, ids, layers, past=None):
    sess = make_session(model.SerializeToString(), optimization="all")
    names = [i.name for i in sess.get_inputs()]
    past_len = 0 if past is None else past[0].shape[2]
    feed = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], past_len + ids.shape[1]), np.int64)}
    for j, name in enumerate(names[2:]):
        layer = layers[j // 2]
        feed[name] = past[j] if past is not None else np.zeros((ids.shape[0], layer.num_heads, 0, layer.head_dim), np.float32)
    return sess.run(None, feed)


def _assert_exact(original, reordered, layers, vocab, seed=0, tol=1e-5):
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 13))
    a, b = _run(original, ids, layers), _run(reordered, ids, layers)
    assert np.abs(a[0] - b[0]).max() <= tol * np.abs(a[0]).max()
    if len(a) > 1:  # one decode step, each graph with its own (permuted) cache
        nxt = ids[:, -1:]
        a2, b2 = _run(original, nxt, layers, a[1:]), _run(reordered, nxt, layers, b[1:])
        assert np.abs(a2[0] - b2[0]).max() <= tol * np.abs(a2[0]).max()


def _random_config(rng):
    heads = int(rng.choice([2, 4, 8]))
    head_dim = int(rng.choice([8, 16, 32]))
    hidden = heads * head_dim
    while hidden > 256:
        head_dim //= 2
        hidden = heads * head_dim
    return dict(num_hidden_layers=int(rng.integers(1, 5)), hidden_size=hidden, num_attention_heads=heads,
                ffn_dim=int(hidden * rng.integers(2, 5)), vocab_size=int(rng.integers(64, 400)),
                max_position_embeddings=64)


@pytest.mark.parametrize("case", range(20))
def test_reorder_is_fp_exact_on_random_configs(case):
    rng = np.random.default_rng(100 + case)
    cfg = _random_config(rng)
    hf = random_opt(seed=case, **cfg)
    graph = to_onnx(hf, with_past=bool(case % 2), exporter="torchscript" if case % 3 == 0 else "dynamo")
    layers = find_layers(graph)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    top = min(32, cfg["hidden_size"]) + 1
    clusters = ClusterCounts(R1=int(rng.integers(1, top)), R2=int(rng.integers(1, min(4, head_dim) + 1)),
                             R3=int(rng.integers(1, min(4, head_dim) + 1)), R4=int(rng.integers(1, top)),
                             R5=int(rng.integers(2, top)))
    layout = "contiguous" if case % 2 == 0 else "zero-copy"
    config = CompileConfig(clusters=clusters, layout=layout, calib=CalibConfig(nsamples=3, seqlen=16))
    windows = np.random.default_rng(case).integers(0, cfg["vocab_size"], (3, 16))
    c = compile_graph(graph, layers, windows, config)
    reordered, plans, report = c.model, c.plans, c.fold
    # the permutations are real (not identities) and clusters contiguous
    assert any((p["R5"].index != np.arange(len(p["R5"].index))).any() for p in plans)
    assert report.gathers == (2 * len(layers) if layout == "contiguous" else 0)
    _assert_exact(graph, reordered, layers, cfg["vocab_size"], seed=case)


def test_reorder_copies_shared_initializers():
    # default-initialised OPT: zero biases and unit LN weights, which exporters store once and share
    from transformers import OPTConfig, OPTForCausalLM
    import torch

    torch.manual_seed(0)
    hf = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    graph = to_onnx(hf, with_past=False)
    layers = find_layers(graph)
    index = GraphIndex(graph)
    assert len(index.readers_of_initializer(layers[0].q_proj.bias)) > 1  # the fixture really shares
    before = graph.SerializeToString()
    rng = np.random.default_rng(0)
    plans = []
    for layer in layers:
        feats = lambda n: rng.normal(size=(n, 2))  # noqa: E731
        plans.append({"R1": plan_clusters(feats(32), 4), "R2": plan_clusters(feats(32), 4, heads=2),
                      "R3": plan_clusters(feats(32), 4, heads=2), "R4": plan_clusters(feats(32), 4),
                      "R5": plan_clusters(feats(64), 8)})
    reordered, report = fold_reorder(graph, layers, plans, layout="contiguous")
    assert report.copied_shared
    assert graph.SerializeToString() == before  # the input graph is not modified
    _assert_exact(graph, reordered, layers, 128)


def test_opt125m_shapes_reorder_is_exact(opt125m):
    _, path = opt125m
    graph = load_model(path)
    layers = find_layers(graph)
    windows = np.random.default_rng(0).integers(0, 50272, (2, 32))
    config = CompileConfig(calib=CalibConfig(nsamples=2, seqlen=32, batch_size=2), layout="contiguous")
    c = compile_graph(graph, layers, windows, config)
    reordered, plans, report = c.model, c.plans, c.fold
    assert [len(p["R2"].counts) for p in plans] == [4 * 12] * 12
    assert report.gathers == 24
    _assert_exact(graph, reordered, layers, 50272)
