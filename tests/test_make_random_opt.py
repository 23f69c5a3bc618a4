"""tools/make_random_opt.py --onnx: an export's graph with N layers, weights streamed to external data, seeded."""

from __future__ import annotations

import collections
import errno
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rptq_onnx.anatomy import find_layers
from rptq_onnx.models import OPT_125M_SHAPES, TINY_SHAPES, random_opt
from rptq_onnx.runtime import make_session
from rptq_onnx.tools import make_random_opt as tool

L3H96 = {**TINY_SHAPES, "num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 6, "ffn_dim": 384}


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rptq_onnx", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny random OPT export written with 3 layers (2-layer template) and the small tokenizer."""
    out = tmp_path_factory.mktemp("random-onnx") / "l3"
    assert tool.main([str(out), "--onnx", "--layers", "3", "--tokenizer"]) == 0
    return out


def test_layer_names():
    assert tool.layer_name("model.model.decoder.layers.1.fc1.weight", 7) == "model.model.decoder.layers.7.fc1.weight"
    assert tool.layer_name("past_key_values.1.key", 12) == "past_key_values.12.key"
    assert tool.layer_name("present.1.value", 3) == "present.3.value"
    assert tool.layer_name("val_143", 5) == "val_143.layer5"
    assert tool.layer_name("node_linear_11", 5) == "node_linear_11.layer5"


def test_parameter_bytes():
    assert tool.parameter_bytes(OPT_125M_SHAPES) == 4 * 125_239_296  # facebook/opt-125m's parameter count


@pytest.mark.slow
def test_parameter_bytes_match_the_torch_model():
    for shapes in (TINY_SHAPES, L3H96):
        assert tool.parameter_bytes(shapes) == 4 * sum(p.numel() for p in random_opt(0, **shapes).parameters())


def _one_linear_model() -> onnx.ModelProto:
    """x·W + b → LayerNorm(γ, β): one parameter of each kind, all external placeholders."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("LayerNormalization", ["y", "g", "beta"], ["out"], axis=-1)]
    inits = []
    for name, dims in (("W", [256, 128]), ("b", [128]), ("g", [128]), ("beta", [128])):
        inits.append(onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=dims))
        tool._point(inits[-1], 0, 0)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 128])], inits)
    return helper.make_model(graph)


def test_weights_are_seeded_drawn_by_role_and_aligned(tmp_path):
    datas = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        model = _one_linear_model()
        (tmp_path / run).mkdir()
        tool.write_weights(model, tmp_path / run / tool.DATA_NAME, seed)
        datas[run] = (tmp_path / run / tool.DATA_NAME).read_bytes()
    assert datas["a"] == datas["b"] and datas["a"] != datas["c"]
    onnx.save_model(model, str(tmp_path / "c" / "model.onnx"))
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "c" / "model.onnx")).graph.initializer}
    assert abs(loaded["W"].std() - 256 ** -0.5) < 0.003  # N(0, 1/fan_in), fan_in = rows of a MatMul weight
    assert abs(loaded["g"].mean() - 1) < 0.06 and abs(loaded["b"].std() - 0.05) < 0.015
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert all(o % tool.ALIGN == 0 for o in offsets)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    assert tool.main([str(full), "--onnx"]) == 2
    assert tool.main([str(tmp_path / "none"), "--onnx", "--layers", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "not empty" in lines[0] and "--layers 0" in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and os.listdir(full) == ["mine.txt"]
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "x"), "--onnx", "--shapes", "opt-13b"])


@pytest.mark.slow
def test_written_model_is_an_export_with_external_data(written):
    names = {p.name for p in written.parent.iterdir()}
    assert names == {"l3"}  # no staging directory or lock left
    assert {p.name for p in written.iterdir()} >= {"model.onnx", "model.onnx.data", "export.json", "config.json",
                                                   "generation_config.json", "genai_config.json", "tokenizer.json"}
    path = str(written / "model.onnx")
    onnx.checker.check_model(path, full_check=True)
    skeleton = onnx.load(path, load_external_data=False)
    params = [t for t in skeleton.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims]
    assert params and all(t.data_location == onnx.TensorProto.EXTERNAL for t in params)
    assert len(find_layers(skeleton)) == 3
    inputs = [i.name for i in skeleton.graph.input]
    assert inputs[-2:] == ["past_key_values.2.key", "past_key_values.2.value"]
    assert [o.name for o in skeleton.graph.output][-1] == "present.2.value"
    make_session(path)


@pytest.mark.slow
def test_same_graph_and_outputs_as_the_export(exported, tmp_path):
    """3 layers from a 2-layer template: the export's ops in the export's order, and with the export's weights
    copied in (by role) the same logits and presents, bit for bit."""
    ref_path = exported("l3h96")
    tool.write_onnx_opt(tmp_path / "ours", L3H96)
    ours, ref = onnx.load(str(tmp_path / "ours" / "model.onnx")), onnx.load(str(ref_path))
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in ref.graph.node]
    assert [i.name for i in ours.graph.input] == [i.name for i in ref.graph.input]
    assert [o.name for o in ours.graph.output] == [o.name for o in ref.graph.output]
    assert len(ours.graph.initializer) == len(ref.graph.initializer)
    assert len(ours.graph.value_info) == len(ref.graph.value_info)
    source = {}
    for a, b in zip(find_layers(ours), find_layers(ref)):
        for role, linear in a.linears().items():
            source[linear.weight], source[linear.bias] = b.linears()[role].weight, b.linears()[role].bias
        for norm, ref_norm in ((a.attn_norm, b.attn_norm), (a.final_norm, b.final_norm)):
            source[norm.weight], source[norm.bias] = ref_norm.weight, ref_norm.bias
    arrays = {t.name: t for t in ref.graph.initializer}
    for t in ours.graph.initializer:
        if t.name in source or t.name.startswith("model."):  # the model-level parameters keep their names
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(arrays[source.get(t.name, t.name)]), t.name))
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 512, (2, 5)), "attention_mask": np.ones((2, 8), np.int64)}
    for i in range(3):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = rng.standard_normal((2, 6, 3, 16)).astype(np.float32)
    got, want = (make_session(m.SerializeToString()).run(None, feed) for m in (ours, ref))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_same_seed_same_bytes_and_layers_do_not_depend_on_depth(written, tmp_path):
    assert tool.main([str(tmp_path / "again"), "--onnx", "--layers", "3", "--tokenizer"]) == 0
    for name in ("model.onnx", "model.onnx.data", "config.json", "genai_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (written / name).read_bytes(), name
    assert tool.main([str(tmp_path / "deeper"), "--onnx", "--layers", "5"]) == 0
    three = {t.name: t for t in onnx.load(str(written / "model.onnx")).graph.initializer}
    five = {t.name: t for t in onnx.load(str(tmp_path / "deeper" / "model.onnx")).graph.initializer}
    counts = collections.Counter(name in five for name in three)
    assert counts == {True: len(three)} and len(five) > len(three)
    for name, t in three.items():
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(five[name]), name)


@pytest.mark.slow
def test_compile_and_generate_run_on_it(written, tmp_path):
    out = tmp_path / "w4a4kv"
    proc = run_cli("compile", written, "-o", out, "--preset", "W4A4KV", "--calib", "random", "--nsamples", "2",
                   "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    assert "compiled 3 layers" in proc.stdout + proc.stderr
    for model in (written, out):
        proc = run_cli("generate", model, "--prompt", "The Congress", "--max-new-tokens", "4")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("The Congress")


@pytest.mark.slow
def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    draw = tool._draw

    def disk_full_later(shape, *args):
        if len(shape) == 2 and shape[0] == 256:  # fc1's weight: some tensors are written by then
            raise OSError(errno.ENOSPC, "No space left on device")
        return draw(shape, *args)

    monkeypatch.setattr(tool, "_draw", disk_full_later)
    assert tool.main([str(tmp_path / "out"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "free some space" in err[0]
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, staging directory or lock
