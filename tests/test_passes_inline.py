"""Every pass on the inline OPT of ``inline_opt.py`` (built with onnx.helper: no torch, no export), checked
against ONNX Runtime runs of the unmodified graph and NumPy. The fast tier's pass tests; the export-based
tests of each pass (slow) check the same on real exports and Llama graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from inline_opt import feeds, inline_opt

from rptq_onnx.anatomy import find_layers, map_model
from rptq_onnx.clustering import plan_clusters
from rptq_onnx.passes.fold_reorder import fold_reorder
from rptq_onnx.passes.fuse_attention import fusable, fuse_attention
from rptq_onnx.passes.insert_taps import insert_taps
from rptq_onnx.passes.quantize_kv_cache import CacheTensor, quantize_kv_cache
from rptq_onnx.point_error import _with_outputs
from rptq_onnx.quant import QParams
from rptq_onnx.runtime import make_session
from rptq_onnx.vocabulary import HESSIAN_TAPS


def run(model: onnx.ModelProto, feed: dict, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """``model``'s outputs (plus the intermediate tensors ``names``) by name."""
    model = _with_outputs(model, names or [])
    session = make_session(model.SerializeToString())
    wanted = [o.name for o in session.get_outputs()]
    return dict(zip(wanted, session.run(wanted, {k: v for k, v in feed.items()
                                                 if k in {i.name for i in session.get_inputs()}})))


def random_plans(layers, seed=0):
    """KMeans plans on random features: R1/R4/R5 whole-tensor, R2/R3 per head (as compile plans them)."""
    rng = np.random.default_rng(seed)
    plans = []
    for layer in layers:
        kv = layer.num_kv_heads * layer.head_dim
        sizes = {"R1": (layer.hidden_size, 1, 4), "R2": (kv, layer.num_kv_heads, 3), "R3": (kv, layer.num_kv_heads, 2),
                 "R4": (layer.hidden_size, 1, 5), "R5": (layer.ffn_dim, 1, 6)}
        plans.append({p: plan_clusters(rng.normal(size=(n, 2)), k, heads=heads) for p, (n, heads, k) in sizes.items()})
    return plans


# --- the inline graph itself -------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_past", [False, True])
def test_inline_graph_is_mapped_like_an_export(with_past):
    model = inline_opt(with_past=with_past)
    onnx.checker.check_model(model, full_check=True)
    layers = find_layers(model)
    assert [(lay.num_heads, lay.head_dim, lay.hidden_size, lay.ffn_dim) for lay in layers] == [(2, 8, 16, 32)] * 2
    assert layers[1].q_proj.weight == "L1.q_proj.weight" and layers[1].mlp_hidden == "L1.relu"
    assert (layers[0].past_key, layers[0].present_value) == \
        (("past_key_values.0.key", "present.0.value") if with_past else (None, None))
    assert map_model(model).shape_inference_error is None


def test_a_shape_inference_failure_is_reported(monkeypatch):
    """When ONNX shape inference fails the layer map says so (a warning naming the graph, and
    ``ModelMap.shape_inference_error``) and uses the shapes the graph declares."""
    from rptq_onnx.anatomy import shapes

    model = onnx.shape_inference.infer_shapes(inline_opt())  # declared shapes in value_info
    model.graph.name = "inline-opt"

    def fail(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] made up\nsecond line")

    monkeypatch.setattr(shapes.shape_inference, "infer_shapes", fail)
    with pytest.warns(RuntimeWarning, match=r"graph 'inline-opt' \(InferenceError: \[ShapeInferenceError\] made up\)"):
        mm = map_model(model)
    assert mm.shape_inference_error == "InferenceError: [ShapeInferenceError] made up"
    assert [lay.num_heads for lay in mm.layers] == [2, 2]


# --- fold_reorder ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,gathers", [("zero-copy", 0), ("contiguous", 4)])
def test_fold_reorder_computes_the_same_function(layout, gathers):
    model = inline_opt(with_past=True)
    layers = find_layers(model)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    plans = random_plans(layers)
    folded, report = fold_reorder(model, layers, plans, layout=layout)
    assert model == before  # the input model is not modified
    assert report.gathers == gathers and report.layout == layout
    feed = feeds(model, past=0)  # a past would have to be fed in the folded channel order
    ref, out = run(model, feed), run(folded, feed)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    for i, plan in enumerate(plans):  # present K/V come out in the clustered channel order (R2, R3)
        for kind, point in (("key", "R2"), ("value", "R3")):
            flat = [x.transpose(0, 2, 1, 3).reshape(2, 5, -1) for x in (ref[f"present.{i}.{kind}"],
                                                                        out[f"present.{i}.{kind}"])]
            np.testing.assert_allclose(flat[1], flat[0][..., plan[point].index], rtol=1e-5, atol=1e-6)
    assert find_layers(folded)[0].hidden_size == 16  # still a decoder graph the layer map reads


def test_fold_reorder_permutes_weights_as_the_plan_says():
    model = inline_opt(layers=1)
    layers = find_layers(model)
    plans = random_plans(layers)
    folded, _ = fold_reorder(model, layers, plans, layout="zero-copy")
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    f = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    r5 = plans[0]["R5"].index
    np.testing.assert_array_equal(f["L0.fc1.weight"], w["L0.fc1.weight"][:, r5])  # R5: fc1 columns
    np.testing.assert_array_equal(f["L0.fc1.bias"], w["L0.fc1.bias"][r5])
    np.testing.assert_array_equal(f["L0.fc2.weight"], w["L0.fc2.weight"][r5, :])  # and fc2 rows
    np.testing.assert_array_equal(f["L0.attn_ln.gamma"], w["L0.attn_ln.gamma"])  # zero-copy: norms untouched


# --- insert_taps -------------------------------------------------------------------------------------------------

def test_taps_are_the_per_sample_channel_ranges():
    model = inline_opt()
    layers = find_layers(model)
    tapped, taps = insert_taps(model, layers, hessians=True)
    assert "logits" not in {o.name for o in tapped.graph.output}
    assert "lm_head" not in {t.name for t in tapped.graph.initializer}  # the LM head is pruned away
    feed = feeds(model, batch=3, seq=7)
    values = run(tapped, feed)
    tensors = run(model, feed, [t.tensor for t in taps])
    for tap in taps:
        x = tensors[tap.tensor]
        if tap.layout == "bhsd":  # [B, H, S, D]: channels h·D + d
            x = x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
        elif tap.layout == "bhdt":  # [B, H, D, T]
            x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], x.shape[3], -1)
        x = x.reshape(3, 7, tap.channels)
        np.testing.assert_allclose(values[tap.output("max")], x.max(axis=1), rtol=1e-5, atol=1e-6, err_msg=tap.name)
        np.testing.assert_allclose(values[tap.output("min")], x.min(axis=1), rtol=1e-5, atol=1e-6, err_msg=tap.name)
        if tap.name in HESSIAN_TAPS:
            flat = x.reshape(-1, tap.channels).astype(np.float64)
            np.testing.assert_allclose(values[tap.output("xtx")], flat.T @ flat, rtol=1e-4, atol=1e-4)
    assert {t.name for t in taps if t.layer == 0} == {"attn_ln", "q_attn", "k_attn", "q", "k", "v", "out_in",
                                                       "ffn_ln", "fc2_in"}


def test_xtx_written_into_preallocated_arrays_equals_what_run_returns():
    from rptq_onnx.runtime import run_into

    model = inline_opt()
    tapped, taps = insert_taps(model, find_layers(model), hessians=True)
    session = make_session(tapped.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    feed = {k: v for k, v in feeds(model, batch=2, seq=5).items() if k in {i.name for i in session.get_inputs()}}
    into = {t.output("xtx"): np.full((t.channels, t.channels), np.nan, np.float32) for t in taps if t.name in HESSIAN_TAPS}
    got = dict(zip(names, run_into(session, names, feed, into)))
    for name, want in zip(names, session.run(names, feed)):
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        if name in into:
            assert got[name] is into[name]  # written in place, not copied


# --- quantize_kv_cache -------------------------------------------------------------------------------------------

def _cache_qparams(x: np.ndarray, bits: int) -> QParams:
    """Per channel of [B, H, T, D] → [H·D], covering ``x``."""
    flat = x.transpose(1, 3, 0, 2).reshape(x.shape[1] * x.shape[3], -1)
    hi, lo = np.maximum(flat.max(1), 0), np.minimum(flat.min(1), 0)
    scale = ((hi - lo) / ((1 << bits) - 1)).astype(np.float32)
    return QParams(scale=scale, zero_point=np.round(-lo / scale).astype(np.int64), bits=bits)


def test_kv_cache_pass_stores_codes_and_reads_them_back():
    model = inline_opt(layers=1, with_past=True)
    feed = feeds(model, seq=2, past=3)
    present = run(model, feed)
    qk, qv = (_cache_qparams(present[f"present.0.{kind}"], 8) for kind in ("key", "value"))
    caches = [CacheTensor("L0.k", "past_key_values.0.key", "present.0.key", 2, 8, qk),
              CacheTensor("L0.v", "past_key_values.0.value", "present.0.value", 2, 8, qv)]
    quantized, report = quantize_kv_cache(model, caches)
    assert report["tensors"] == 2 and report["containers"] == ["UINT8"]

    def codes(x, qp):  # [B, H, T, D] → uint8 [B, H·D, T], as QuantizeLinear(axis=1)
        c = x.transpose(0, 1, 3, 2).reshape(x.shape[0], -1, x.shape[2])
        return np.clip(np.round(c / qp.scale[None, :, None]) + qp.zero_point[None, :, None], 0, 255).astype(np.uint8)

    def dequantized(c, qp):  # uint8 [B, H·D, T] → float [B, H, T, D]
        x = (c.astype(np.float32) - qp.zero_point[None, :, None].astype(np.float32)) * qp.scale[None, :, None]
        return x.reshape(x.shape[0], 2, 8, -1).transpose(0, 1, 3, 2)

    past = {"past_key_values.0.key": codes(feed["past_key_values.0.key"], qk),
            "past_key_values.0.value": codes(feed["past_key_values.0.value"], qv)}
    out = run(quantized, {**feed, **past})
    # the graph attends over the dequantized past: as the float graph fed that past
    ref = run(model, {**feed, **{name: dequantized(c, qp) for (name, c), qp in zip(past.items(), (qk, qv))}})
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    for kind, qp in (("key", qk), ("value", qv)):
        assert out[f"present.0.{kind}"].dtype == np.uint8
        np.testing.assert_array_equal(out[f"present.0.{kind}"], codes(ref[f"present.0.{kind}"], qp))


# --- fuse_attention ----------------------------------------------------------------------------------------------

def test_fused_attention_equals_eager_on_a_decode_step():
    model = inline_opt(with_past=True)
    layers = find_layers(model)
    assert fusable(inline_opt(with_past=False)) == "the graph has no KV cache (export it with --with-past)"
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    fused, report = fuse_attention(fused, layers)
    assert report["layers"] == 2 and report["cache"] == "float"
    assert [n.op_type for n in fused.graph.node].count("GroupQueryAttention") == 2
    assert not {"Softmax", "Concat"} & {n.op_type for n in fused.graph.node}
    feed = feeds(model, seq=1, past=4)  # one new token: causal masking has nothing to hide
    ref, out = run(model, feed), run(fused, feed)
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
