"""Compiled graphs agree with an independent NumPy fake-quant of each layer, integer for integer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from rptq_onnx.anatomy import find_layers
from rptq_onnx.compile import compile_graph
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.export import to_onnx
from rptq_onnx.models import random_opt
from rptq_onnx.reference import LayerReference
from rptq_onnx.runtime import feeds_for, make_session, numpy_outputs

pytestmark = pytest.mark.slow  # every test here exports or compiles a model

CONFIGS = [dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, ffn_dim=64),
           dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=192),
           dict(num_hidden_layers=2, hidden_size=96, num_attention_heads=3, ffn_dim=256)]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in have)
    return out


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("cfg_id", range(3))
def test_qdq_codes_and_layer_outputs_match_numpy(cfg_id, bits):
    cfg = CONFIGS[cfg_id]
    hf = random_opt(seed=10 + cfg_id, vocab_size=200, max_position_embeddings=64, **cfg)
    graph = to_onnx(hf, with_past=cfg_id == 1, exporter="torchscript" if cfg_id == 2 else "dynamo")
    layers = find_layers(graph)
    # 8-bit MatMulNBits (accuracy level 4) rounds its input to int8 per block a second time, which the
    # float oracle does not model: the oracle compares W8 through DequantizeLinear weights (an exact float GEMM)
    quant = QuantSpec(wbits=bits if bits != 3 else 4, abits=bits, weight_quant="rtn", matmulnbits=bits != 8)
    config = CompileConfig(preset="W8A8", clusters=ClusterCounts(R1=4, R2=2, R3=2, R4=4, R5=8), quant=quant,
                           calib=CalibConfig(nsamples=4, seqlen=24), layout="contiguous" if cfg_id == 1 else "zero-copy")
    windows = np.random.default_rng(cfg_id).integers(0, 200, (4, 24))
    compiled = compile_graph(graph, layers, windows, config).model
    qlayers = find_layers(compiled)
    refs = [LayerReference(compiled, layer) for layer in qlayers]
    names = []
    for ref in refs:
        names += [ref.layer.attn_norm.input, ref.layer_output()]
        for tag, src in ref.qdq_input.items():
            names += [src, f"rptq.qdq.L{ref.layer.index}.{tag}.dq"]
    sess = make_session(_with_outputs(compiled, names).SerializeToString(), optimization="all")
    ids = np.random.default_rng(99).integers(0, 200, (2, 16))
    fetch = numpy_outputs(sess)  # the 4-bit present outputs of the with-past graph stay out of NumPy
    values = dict(zip(fetch, sess.run(fetch, feeds_for(sess, ids, qlayers))))
    assert values["logits"].shape == (2, 16, 200) and np.isfinite(values["logits"]).all()
    points = 0
    for ref in refs:
        for tag, qdq in ref.qdq.items():
            pre = values[ref.qdq_input[tag]]
            dq = values[f"rptq.qdq.L{ref.layer.index}.{tag}.dq"]
            graph_codes = np.rint(dq / qdq.scale).astype(np.int64) + qdq.zero_point
            np.testing.assert_array_equal(graph_codes, qdq.codes(pre), err_msg=f"layer {ref.layer.index} {tag}")
            assert graph_codes.max() <= (1 << (bits if tag not in ("attn_ln", "ffn_ln", "P") else 8)) - 1
            points += 1
        x = values[ref.layer.attn_norm.input].reshape(2, 16, -1)
        out = ref.forward(x, scaling=ref.layer.head_dim ** -0.5)
        want = values[ref.layer_output()].reshape(out.shape)
        assert np.abs(out - want).max() <= 2e-3 * np.abs(want).max()
    assert points == 8 * len(refs)  # R1, q, k, v, P, R3, R4, R5 per layer
