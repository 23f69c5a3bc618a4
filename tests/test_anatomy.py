"""The layer map finds every R-point by structure, on both exporters and several configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rptq_onnx import RptqError
from rptq_onnx.anatomy import find_layers, map_model
from rptq_onnx.export import to_onnx
from rptq_onnx.graph import load_model
from rptq_onnx.models import random_opt


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _as_out_in(model, lin):
    w = _init(model, lin.weight)
    return w if lin.weight_layout == "out_in" else w.T


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["l1h32", "l3h96", "l2h128"])
def test_layer_map_locates_every_point(opt_dir, exported, name, exporter):
    path = exported(name, with_past=True, exporter=exporter)
    model = load_model(path)
    layers = find_layers(model)
    hf = AutoModelForCausalLM.from_pretrained(str(opt_dir(name))).eval()
    cfg = hf.config
    assert len(layers) == cfg.num_hidden_layers
    for layer, ref in zip(layers, hf.model.decoder.layers):
        assert layer.num_heads == cfg.num_attention_heads
        assert layer.head_dim * layer.num_heads == layer.hidden_size == cfg.hidden_size
        assert layer.ffn_dim == cfg.ffn_dim
        # every linear is the right torch module: compare weights and biases by value, not by name
        for lin, mod in [(layer.q_proj, ref.self_attn.q_proj), (layer.k_proj, ref.self_attn.k_proj),
                         (layer.v_proj, ref.self_attn.v_proj), (layer.out_proj, ref.self_attn.out_proj),
                         (layer.fc1, ref.fc1), (layer.fc2, ref.fc2)]:
            np.testing.assert_array_equal(_as_out_in(model, lin), mod.weight.detach().numpy())
            np.testing.assert_array_equal(_init(model, lin.bias), mod.bias.detach().numpy())
        for norm, mod in [(layer.attn_norm, ref.self_attn_layer_norm), (layer.final_norm, ref.final_layer_norm)]:
            np.testing.assert_array_equal(_init(model, norm.weight), mod.weight.detach().numpy())
            np.testing.assert_array_equal(_init(model, norm.bias), mod.bias.detach().numpy())
        assert layer.fc1.op == "Gemm" and layer.fc1.weight_layout == "out_in"
        assert layer.q_proj.op == "MatMul" and layer.q_proj.weight_layout == "in_out"
        assert layer.present_key == f"present.{layer.index}.key"
        assert layer.present_value == f"present.{layer.index}.value"
        assert layer.past_key == f"past_key_values.{layer.index}.key"
        assert layer.past_value == f"past_key_values.{layer.index}.value"
        # R-points are the tensors the reorder pass touches
        pts = layer.points()
        assert pts["R1"] == (layer.attn_norm.output,) and pts["R4"] == (layer.final_norm.output,)
        assert pts["R2"] == (layer.q_proj.output, layer.k_proj.output)
        assert pts["R3"] == (layer.out_proj.input,) and pts["R5"] == (layer.fc2.input,)  # no Q/DQ in an export
    assert map_model(model).with_past


@pytest.mark.slow
def test_dynamo_scope_metadata_agrees(exported):
    """Cross-check with the module path the dynamo exporter keeps in node metadata."""
    model = load_model(exported("l3h96"))
    nodes = {n.name: n for n in model.graph.node}

    def scope(node_name):
        props = {p.key: p.value for p in nodes[node_name].metadata_props}
        return props.get("pkg.torch.onnx.name_scopes", "")

    for layer in find_layers(model):
        i = layer.index
        for role, lin in [("q_proj", layer.q_proj), ("k_proj", layer.k_proj), ("v_proj", layer.v_proj),
                          ("out_proj", layer.out_proj), ("fc1", layer.fc1), ("fc2", layer.fc2)]:
            assert f"layers.{i}" in scope(lin.node) and role in scope(lin.node)
        assert "self_attn_layer_norm" in scope(layer.attn_norm.node)
        assert "final_layer_norm" in scope(layer.final_norm.node)


@pytest.mark.slow
def test_no_past_graph_has_no_cache_tensors(exported):
    mm = map_model(load_model(exported("tiny", with_past=False)))
    assert not mm.with_past
    assert all(layer.present_key is None and layer.past_key is None for layer in mm.layers)


def test_shared_initializers_are_reported():
    # one bias tensor read by two Adds (directly and through Identity), as exporters dedupe
    b = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    g = helper.make_graph(
        [helper.make_node("Identity", ["bias"], ["bias_copy"]),
         helper.make_node("Add", ["x", "bias"], ["y"]), helper.make_node("Add", ["y", "bias_copy"], ["z"]),
         helper.make_node("Softmax", ["z"], ["p"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 4])], [b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    from rptq_onnx.graph import GraphIndex

    assert len(GraphIndex(model).readers_of_initializer("bias")) == 2


def _tiny_graph(op_type, domain=""):
    nodes = [helper.make_node(op_type, ["x", "w"], ["y"], domain=domain)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=opsets)


def test_non_opt_graph_is_rejected_with_one_line():
    with pytest.raises(RptqError, match="no attention Softmax") as err:
        find_layers(_tiny_graph("MatMul"))
    assert "\n" not in str(err.value)


def test_fused_attention_is_rejected():
    with pytest.raises(RptqError, match="fused attention"):
        find_layers(_tiny_graph("MultiHeadAttention", "com.microsoft"))


@pytest.mark.slow
def test_post_ln_opt_graph_is_rejected():
    model = random_opt(0, do_layer_norm_before=False, num_hidden_layers=1)
    graph = to_onnx(model, with_past=False, exporter="torchscript")
    with pytest.raises(RptqError, match="layer 0: .*post-LN") as err:
        find_layers(graph)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_gpt2_graph_is_rejected():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                      attn_implementation="eager")).eval()
    ids = torch.zeros(1, 4, dtype=torch.int64)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = gpt2

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    program = torch.onnx.export(Logits().eval(), (ids,), None, dynamo=True, opset_version=21, verbose=False)
    with pytest.raises(RptqError, match="layer 0: ") as err:
        find_layers(program.model_proto)
    assert "\n" not in str(err.value)
