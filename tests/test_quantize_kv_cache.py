"""passes/quantize_kv_cache.py: the cache crosses decode steps as uint4/uint8 codes, losslessly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rptq_onnx.anatomy import find_layers
from rptq_onnx.generate import Generator, cache_codes
from rptq_onnx.graph import GraphIndex
from rptq_onnx.inspection import describe
from rptq_onnx.runtime import feeds_for, make_session

KV_PRESETS = ("W4A4KV", "W4A3KV", "W3A3KV")


def _cache_io(model_dir):
    m = onnx.load(model_dir / "model.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    return m, {n: t for n, t in types.items() if n.startswith(("past_key_values.", "present."))}


@pytest.mark.slow
@pytest.mark.parametrize("preset", KV_PRESETS + ("W8A8",))
def test_cache_inputs_and_outputs_are_low_bit(compiled_text, preset):
    m, types = _cache_io(compiled_text(preset))
    want = onnx.TensorProto.UINT8 if preset == "W8A8" else onnx.TensorProto.UINT4
    assert types and set(types.values()) == {want}
    onnx.checker.check_model(m)
    layers = find_layers(m)  # the layer map still finds every cache tensor through the store/load chains
    assert all(lay.past_key and lay.present_key and lay.past_value and lay.present_value for lay in layers)
    cache = describe(compiled_text(preset) / "model.onnx")["cache"]  # what `inspect` reports
    assert cache["dtype"] == ("uint8" if preset == "W8A8" else "uint4") and "real low-bit" in cache["storage"]
    index = GraphIndex(m)
    for lay in layers:
        store = index.producer[lay.present_key]
        assert store.op_type == "QuantizeLinear" and store.name == f"rptq.kv.L{lay.index}.k.present.quantize"


@pytest.mark.slow
@pytest.mark.parametrize("preset", KV_PRESETS)
def test_cached_decoding_equals_recomputation(compiled_text, preset):
    """Step t of the cached graph = position t of the no-cache graph on the whole sequence (32 + 32 tokens)."""
    gen = Generator(compiled_text(preset))
    prompt = gen.encode(["The Congress of the United States has the duty to provide for the defense of the nation"],
                        chat=False)[0]
    prompt = (prompt * 32)[:32]
    out = gen.generate_ids([prompt], max_new_tokens=32, keep_logits=True, stop_at_eos=False)
    assert out.prompt_tokens == [32] and len(out.new_tokens[0]) == 32

    nocache = make_session(compiled_text(preset, with_past=False) / "model.onnx")
    full = np.array([prompt + out.new_tokens[0]])
    ref = nocache.run(["logits"], feeds_for(nocache, full))[0][0]
    # A K/V value within float rounding of a step's midpoint may round to the next code when computed for one
    # token rather than for 64 (another GEMM summation order), and that code stays in the cache: most steps are
    # equal to float rounding, none is more than a code flip away, every token is the same.
    exact = 0
    for t, step in enumerate(out.step_logits):
        want = ref[31 + t]
        gap = np.abs(step[0] - want).max() / np.abs(want).max()
        assert gap <= 1e-2, f"step {t}: {gap:.2e}"
        exact += gap <= 1e-4
        assert int(step[0].argmax()) == int(want.argmax()) == out.new_tokens[0][t]
    assert exact >= 24, f"{exact} of 32 steps equal to float rounding"

    # 4 bits per element, nothing else per token: 32 + 31 tokens are in the cache after the last step
    c = out.cache
    assert c.element_type == "tensor(uint4)" and c.tokens == 63
    layer = find_layers(onnx.load(compiled_text(preset) / "model.onnx"))[0]
    elements = 2 * c.layers * c.batch * c.tokens * layer.num_kv_heads * layer.head_dim
    assert c.bytes_total == elements // 2
    assert c.bytes_total * 3.9 <= 2 * elements and c.bytes_total * 7.8 <= 4 * elements


@pytest.mark.slow
def test_codes_dequantize_to_the_float_cache(compiled_text_opt):
    """Unpacked uint4 codes × scales equal the float cache of the same model (--float-cache), and 3-bit codes ≤ 7."""
    low = Generator(compiled_text_opt("W3A3KV"))
    flt = Generator(compiled_text_opt("W3A3KV", float_cache=True))
    assert flt.cache_type == "tensor(float)"
    ids = np.array([[5, 17, 99, 3, 250, 42, 7]])
    mask = np.ones_like(ids)
    _, low_past = low.step(ids, mask, low.empty_past(1))
    _, flt_past = flt.step(ids, mask, flt.empty_past(1))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(compiled_text_opt("W3A3KV") / "model.onnx").graph.initializer}
    for name, value in low_past.items():
        layer, kind = name.split(".")[1:3]
        codes = cache_codes(value)
        assert codes.max() <= 7
        scale, zp = inits[f"rptq.kv.L{layer}.{kind[0]}.scale"], inits[f"rptq.kv.L{layer}.{kind[0]}.zero_point"]
        deq = (codes.astype(np.float32) - zp.astype(np.float32)[:, None]) * scale[:, None]  # [B, H*D, T]
        want = flt_past[name].numpy()  # [B, H, T, D]
        b, h, t, d = want.shape
        np.testing.assert_allclose(deq.reshape(b, h, d, t).transpose(0, 1, 3, 2), want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_low_bit_past_feeds_perplexity_prefill(compiled_text_opt):
    """A KV-compiled with-past graph still evaluates (empty uint4 past fed as an OrtValue)."""
    d = compiled_text_opt("W4A4KV")
    s = make_session(d / "model.onnx")
    ids = np.arange(10, 42).reshape(1, 32)
    with_past = s.run(["logits"], feeds_for(s, ids))[0]
    s2 = make_session(compiled_text_opt("W4A4KV", with_past=False) / "model.onnx")
    np.testing.assert_allclose(with_past, s2.run(["logits"], feeds_for(s2, ids))[0], rtol=1e-4, atol=1e-4)


def test_codes_round_trip_through_ortvalues():
    from rptq_onnx.generate import codes_to_ortvalue

    codes = np.random.default_rng(0).integers(0, 16, (2, 5, 7)).astype(np.uint8)  # odd element count
    value = codes_to_ortvalue(codes, "tensor(uint4)")
    assert value.data_type() == "tensor(uint4)" and value.tensor_size_in_bytes() == (codes.size + 1) // 2
    np.testing.assert_array_equal(cache_codes(value), codes)
