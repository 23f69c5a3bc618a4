"""Layer-wise calibration and compile (rptq_onnx/layerwise.py, rptq_onnx/compile_layerwise.py): the same
statistics, clusters and codes as the whole graph with float propagation; quantized propagation is
deterministic and changes what later layers see."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rptq_onnx.anatomy import find_layers
from rptq_onnx.calibrate import calibrate, calibrate_layerwise
from rptq_onnx.compile import compile_model
from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec
from rptq_onnx.errors import RptqError
from rptq_onnx.export import export
from rptq_onnx.graph import load_model
from rptq_onnx.layerwise import find_cut
from rptq_onnx.models import TINY_LLAMA_SHAPES, save_random_llama


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("lw-llama")
    hf = save_random_llama(root / "hf", seed=2, **{**TINY_LLAMA_SHAPES, "num_key_value_heads": 2})
    return export(str(hf), root / "onnx").model_path


@pytest.fixture(params=["opt", "llama"])
def source(request, exported, llama_onnx):
    return exported("l3h96") if request.param == "opt" else llama_onnx


def _initializers(path):
    return {t.name: numpy_helper.to_array(t, str(path.parent)) for t in onnx.load(str(path)).graph.initializer}


def _nodes(path):
    return sorted((n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in onnx.load(str(path)).graph.node)


def test_layerwise_calibration_equals_whole_graph(source):
    """Every observer and every XᵀX sum is the same, bit for bit, when layers run one at a time."""
    model = load_model(source, load_weights=False)
    layers = find_layers(model)
    windows = np.random.default_rng(0).integers(0, 500, (5, 24))
    whole = calibrate(model, layers, windows, batch_size=2, progress=False, model_dir=source.parent, hessians=True)
    split = calibrate_layerwise(model, layers, windows, batch_size=2, model_dir=source.parent, hessians=True)
    assert whole.stats.keys() == split.stats.keys() and whole.xtx.keys() == split.xtx.keys() and whole.xtx
    for key, st in whole.stats.items():
        for observer in ("minmax", "ema", "mean"):
            for a, b in zip(getattr(st, observer).range(), getattr(split.stats[key], observer).range()):
                np.testing.assert_array_equal(a, b)
    for key, xtx in whole.xtx.items():
        np.testing.assert_array_equal(xtx, split.xtx[key])
    assert whole.tokens == split.tokens == windows.size


def test_cut_names_each_layers_stream(source):
    model = load_model(source, load_weights=False)
    layers = find_layers(model)
    cut = find_cut(model, layers)
    assert len(cut.inputs) == len(cut.outputs) == len(layers)
    assert cut.outputs[:-1] == cut.inputs[1:]
    assert all(layer.attn_norm.input == stream for layer, stream in zip(layers, cut.inputs))
    assert cut.side  # the attention mask at least comes from the prologue


@pytest.mark.parametrize("preset,options,observer", [
    ("W4A4", dict(layout="zero-copy"), "auto"),  # GPTQ weights, every activation point, eager attention
    ("W4A8", dict(layout="contiguous"), "auto"),  # norm Gathers, RoPE tables reordered (Llama)
    ("W4A4KV", dict(attention="auto"), "auto"),  # fused attention over the 4-bit cache
    ("W4A4", dict(layout="zero-copy"), "mse"),  # searched ranges: token samples kept, then dropped per layer
])
def test_layerwise_compile_equals_whole_graph(source, tmp_path, preset, options, observer):
    """With float propagation the layer-wise compile writes the same nodes, initializers, clusters and
    report as the whole-graph compile."""
    config = CompileConfig(preset=preset, quant=QuantSpec.for_preset(preset, observer=observer),
                           calib=CalibConfig(source="random", nsamples=4, seqlen=32), **options)
    whole = compile_model(str(source), tmp_path / "whole", config, progress=False, layer_wise=False)
    split = compile_model(str(source), tmp_path / "split", config, progress=False)  # layer-wise by default
    assert _nodes(whole.model_path) == _nodes(split.model_path)
    a, b = _initializers(whole.model_path), _initializers(split.model_path)
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name], err_msg=name)
    assert (tmp_path / "whole" / "clusters.json").read_text() == (tmp_path / "split" / "clusters.json").read_text()
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "split"))
    for key in ("clusters", "quantization", "permuted_initializers", "gathers_added", "recipe"):
        assert ra[key] == rb[key], key
    assert (ra["mode"], rb["mode"]) == ("whole-graph", "layer-wise")
    assert {"prologue", "layers", "calibrate", "quantize"} <= set(rb["timings_s"]) and "layers" not in ra["timings_s"]


def test_quantized_propagation_is_deterministic_and_differs(exported, tmp_path):
    src = exported("l3h96")
    config = CompileConfig(preset="W4A4", quant=QuantSpec.for_preset("W4A4", weight_quant="rtn"),
                           calib=CalibConfig(source="random", nsamples=4, seqlen=32), propagate="quantized")
    one = compile_model(str(src), tmp_path / "one", config, progress=False)
    two = compile_model(str(src), tmp_path / "two", config, progress=False)
    assert one.model_path.read_bytes() == two.model_path.read_bytes()
    floated = compile_model(str(src), tmp_path / "float", CompileConfig(
        preset="W4A4", quant=config.quant, calib=config.calib), progress=False, layer_wise=False)
    a, b = _initializers(one.model_path), _initializers(floated.model_path)
    assert a.keys() == b.keys()
    layer0 = [n for n in a if ".L0." in n or "layers.0." in n]
    later = [n for n in a if n not in layer0 and not np.array_equal(a[n], b[n])]
    assert all(np.array_equal(a[n], b[n]) for n in layer0 if a[n].dtype.kind == "f")  # layer 0 sees the same stream
    assert later  # later layers are calibrated on the quantized stream


def test_bad_propagation_is_one_line(exported, tmp_path):
    with pytest.raises(RptqError, match="--propagate sideways is unknown"):
        CompileConfig(propagate="sideways")
    from test_cli import assert_one_line_error, run_cli

    result = run_cli("compile", exported("tiny"), "-o", tmp_path / "out", "--calib", "random", "--nsamples", "2",
                     "--seqlen", "16", "--propagate", "quantized", "--whole-graph")
    assert_one_line_error(result, "--propagate quantized calibrates layer by layer; drop --whole-graph")
    assert not (tmp_path / "out").exists()
