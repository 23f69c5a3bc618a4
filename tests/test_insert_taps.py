"""Calibration taps: per-sample per-channel max/min rows equal torch's, and nothing big leaves the graph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rptq_onnx.anatomy import find_layers
from rptq_onnx.calibrate import calibrate
from rptq_onnx.graph import load_model
from rptq_onnx.passes.insert_taps import insert_taps
from rptq_onnx.vocabulary import TAPS
from rptq_onnx.runtime import feeds_for, make_session

pytestmark = pytest.mark.slow  # every test here exports or compiles a model


def _torch_ranges(model_dir, ids):
    """Per-sample per-channel (max, min) of the tapped tensors, from forward hooks."""
    return {k: (v.amax(1).numpy(), v.amin(1).numpy()) for k, v in _torch_tensors(model_dir, ids).items()}


def _torch_tensors(model_dir, ids):
    """The tapped tensors [B, S, C] (q_attn / k_attn as the reference taps them), from forward hooks."""
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    batch = ids.shape[0]
    got = {}

    def keep(name, fn):
        def hook(mod, inp, out):
            got[name] = fn(inp, out)
        return hook

    handles = []
    for i, layer in enumerate(hf.model.decoder.layers):
        att = layer.self_attn
        handles += [
            layer.self_attn_layer_norm.register_forward_hook(keep((i, "attn_ln"), lambda a, o: o)),
            att.q_proj.register_forward_hook(keep((i, "q"), lambda a, o: o)),
            att.k_proj.register_forward_hook(keep((i, "k"), lambda a, o: o)),
            att.v_proj.register_forward_hook(keep((i, "v"), lambda a, o: o)),
            att.out_proj.register_forward_hook(keep((i, "out_in"), lambda a, o: a[0])),
            layer.final_layer_norm.register_forward_hook(keep((i, "ffn_ln"), lambda a, o: o.reshape(batch, -1, o.shape[-1]))),
            layer.fc2.register_forward_hook(keep((i, "fc2_in"), lambda a, o: a[0].reshape(batch, -1, a[0].shape[-1]))),
        ]
    with torch.no_grad():
        hf(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)))
    for h in handles:
        h.remove()
    scale = hf.model.decoder.layers[0].self_attn.scaling
    for i in range(len(hf.model.decoder.layers)):
        got[(i, "q_attn")] = got[(i, "q")] * scale  # the reference taps q after scaling
        got[(i, "k_attn")] = got[(i, "k")]
    return got


def test_taps_equal_torch_ranges(opt_dir, exported):
    path = exported("l3h96")
    model = load_model(path)
    layers = find_layers(model)
    tapped, taps = insert_taps(model, layers)
    # exactly two reductions per tap, nothing of size [B, S, C] among the outputs, LM head gone
    ops = Counter(n.op_type for n in tapped.graph.node)
    assert ops["ReduceMax"] == ops["ReduceMin"] == len(TAPS) * len(layers)
    assert len(tapped.graph.output) == 2 * len(TAPS) * len(layers)
    assert all(o.name.startswith("rptq.tap.L") for o in tapped.graph.output)
    # 6 linears + QKᵀ + PV per layer, less the last fc2 (only the LM head needed it): no LM head
    assert ops["MatMul"] + ops["Gemm"] == 8 * len(layers) - 1
    assert len(model.graph.output) == 1 + 2 * len(layers)  # input model untouched

    ids = np.random.default_rng(0).integers(0, 512, (3, 17))
    sess = make_session(tapped.SerializeToString())
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds_for(sess, ids, layers))))
    ref = _torch_ranges(opt_dir("l3h96"), ids)
    for tap in taps:
        mx, mn = out[tap.output("max")], out[tap.output("min")]
        assert mx.shape == (3, tap.channels)
        np.testing.assert_allclose(mx, ref[(tap.layer, tap.name)][0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(mn, ref[(tap.layer, tap.name)][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_calibrate_merges_batches_independently_of_batch_size(exported, batch_size):
    model = load_model(exported("tiny"))
    layers = find_layers(model)
    windows = np.random.default_rng(3).integers(0, 512, (5, 12))
    stats = calibrate(model, layers, windows, batch_size=batch_size, progress=False).stats
    ref = calibrate(model, layers, windows, batch_size=5, progress=False).stats
    for key, st in stats.items():
        np.testing.assert_allclose(st.minmax.max, ref[key].minmax.max, rtol=1e-6)
        np.testing.assert_allclose(st.ema.min, ref[key].ema.min, rtol=1e-6)
        assert st.minmax.samples == 5


def test_sampled_taps_keep_every_kth_token_of_each_quantized_point(opt_dir, exported):
    from rptq_onnx.passes.insert_taps import SAMPLED_TAPS

    model = load_model(exported("l3h96"))
    layers = find_layers(model)
    tapped, taps = insert_taps(model, layers, sample_taps=frozenset(SAMPLED_TAPS), sample_every=4)
    samples = [o.name for o in tapped.graph.output if o.name.endswith(".sample")]
    assert len(samples) == len(SAMPLED_TAPS) * len(layers)  # not q_attn / k_attn: those only feed clustering
    ids = np.random.default_rng(0).integers(0, 512, (3, 17))
    sess = make_session(tapped.SerializeToString())
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds_for(sess, ids, layers))))
    ref = _torch_tensors(opt_dir("l3h96"), ids)
    for tap in taps:
        if tap.name in SAMPLED_TAPS:
            want = ref[(tap.layer, tap.name)].numpy()[:, ::4]
            assert out[tap.output("sample")].shape == (3, 5, tap.channels)
            np.testing.assert_allclose(out[tap.output("sample")], want, atol=1e-5, rtol=1e-5)
    stats = calibrate(model, layers, np.tile(ids, (2, 1)), batch_size=3, progress=False,
                      sample_taps=frozenset({"fc2_in"})).stats  # every 4th token (observers.SAMPLE_EVERY)
    assert stats[(0, "fc2_in")].sample.shape == (6 * 5, layers[0].ffn_dim)  # tokens × channels, every batch
    assert stats[(0, "out_in")].sample is None and stats[(0, "q_attn")].sample is None


def test_skip_first_leaves_each_windows_first_token_out_of_the_ranges(opt_dir, exported):
    from rptq_onnx.passes.insert_taps import FIRST_TOKEN_TAPS

    model = load_model(exported("l3h96"))
    layers = find_layers(model)
    ids = np.random.default_rng(0).integers(0, 512, (3, 17))
    ref = _torch_tensors(opt_dir("l3h96"), ids)
    calib = calibrate(model, layers, ids, batch_size=3, progress=False, skip_first=frozenset(FIRST_TOKEN_TAPS),
                      sample_taps=frozenset({"fc2_in"}))
    assert calib.skipped_first == frozenset(FIRST_TOKEN_TAPS)
    for (layer, tap), st in calib.stats.items():
        if tap not in ("attn_ln", "q", "out_in", "ffn_ln", "fc2_in"):
            continue
        values = ref[(layer, tap)].numpy()  # [B, S, C]
        kept = values[:, 1:] if tap in FIRST_TOKEN_TAPS else values
        np.testing.assert_allclose(st.minmax.max, kept.max((0, 1)), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(st.minmax.min, kept.min((0, 1)), atol=1e-5, rtol=1e-5)
    # every 4th token from position 1 on: positions 1, 5, 9, 13
    np.testing.assert_allclose(calib.stats[(0, "fc2_in")].sample,
                               ref[(0, "fc2_in")].numpy()[:, 1::4].reshape(-1, layers[0].ffn_dim), atol=1e-5, rtol=1e-5)
