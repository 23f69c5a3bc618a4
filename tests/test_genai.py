"""rptq_onnx/genai.py: genai_config.json beside compiled models, and `generate --runtime genai` (onnxruntime-genai)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from rptq_onnx.genai import GENAI_CONFIG_NAME
from test_cli import assert_one_line_error, run_cli

HAVE_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
needs_genai = pytest.mark.skipif(not HAVE_GENAI, reason="onnxruntime-genai is not installed "
                                                        "(pip install onnxruntime-genai-cuda==0.18.0)")
PROMPTS = ["The Congress", "In the course of the last year the nation has"]


@pytest.fixture(scope="module")
def fused(text_opt, text_llama, tmp_path_factory):
    """``fused(family, preset="W4A4KV") -> Path``: the tiny text model compiled with fused attention (cached)."""
    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec

    cache = {}

    def get(family: str, preset: str = "W4A4KV"):
        if (family, preset) not in cache:
            source = text_opt if family == "opt" else text_llama
            config = CompileConfig(preset=preset, calib=CalibConfig(source="sotu-train", nsamples=4, seqlen=64),
                                   quant=QuantSpec.for_preset(preset, weight_quant="rtn"), attention="fused")
            out = tmp_path_factory.mktemp(f"genai-{family}-{preset}")
            cache[family, preset] = compile_model(str(source), out, config, progress=False).model_path.parent
        return cache[family, preset]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_compile_writes_genai_config(fused, family):
    config = json.loads((fused(family) / GENAI_CONFIG_NAME).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == ("decoder" if family == "opt" else "llama")  # OPT is no GenAI type: the generic one
    assert decoder["filename"] == "model.onnx" and decoder["num_hidden_layers"] == 2
    assert decoder["head_size"] == 16 and decoder["num_key_value_heads"] == (4 if family == "opt" else 2)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert "position_ids" not in decoder["inputs"]  # OPT derives positions from the mask; Llama's RoPE is inside GQA
    assert config["search"]["past_present_share_buffer"] is False  # the graph's mask needs the exact past
    assert model["context_length"] == config["search"]["max_length"] == 256


@pytest.mark.slow
def test_no_genai_config_where_genai_cannot_hold_the_cache(compiled_text_opt, exported):
    assert not (compiled_text_opt("W4A4KV") / GENAI_CONFIG_NAME).exists()  # eager: [B, C, T] uint4 codes
    assert not (exported("tiny", with_past=False).parent / GENAI_CONFIG_NAME).exists()
    assert (exported("tiny").parent / GENAI_CONFIG_NAME).is_file()  # a float cache


@needs_genai
@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_genai_generates_the_greedy_tokens_of_ort(fused, family):
    from rptq_onnx.genai import GenaiGenerator
    from rptq_onnx.generate import Generator

    folder = fused(family)
    ours, genai = Generator(folder), GenaiGenerator(folder)
    assert genai.cache_kind == "int4 (two codes per byte, in uint8)"
    for chat in (False, True):  # the tiny Llama's tokenizer has a chat template; GenAI applies it too
        encoded = ours.encode(PROMPTS, chat)
        assert [genai.encode(p, chat) for p in PROMPTS] == encoded
        for ids in encoded:
            want = ours.generate_ids([ids], max_new_tokens=16).new_tokens
            got = genai.generate_ids([ids], max_new_tokens=16)
            assert got.new_tokens == want, (family, chat)
    assert got.cache.bytes_per_token_per_layer == genai.layout.bytes_per_token_per_layer


@needs_genai
@pytest.mark.slow
def test_cli_generate_runtime_genai(fused):
    args = ("generate", fused("llama"), "--prompt", "The Congress", "--max-new-tokens", "8", "--no-chat-template")
    genai, ort = run_cli(*args, "--runtime", "genai"), run_cli(*args)
    assert genai.returncode == 0, genai.stderr
    assert genai.stdout.startswith("The Congress") and genai.stdout == ort.stdout
    assert "cache int4 (two codes per byte, in uint8) held between steps by onnxruntime-genai on cpu" in genai.stderr


@pytest.mark.slow
def test_runtime_genai_without_the_package_is_one_line(exported, tmp_path):
    stub = tmp_path / "stub" / "onnxruntime_genai"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named onnxruntime_genai')\n")
    proc = run_cli("generate", exported("tiny").parent, "--prompt", "hi", "--runtime", "genai",
                   env_extra={"PYTHONPATH": str(stub.parent)})
    assert_one_line_error(proc, "--runtime genai needs onnxruntime-genai", "pip install onnxruntime-genai-cuda==0.18.0")


@pytest.mark.slow
def test_runtime_genai_refuses_models_it_cannot_run(exported, compiled_text_opt, tmp_path):
    no_cache = run_cli("generate", exported("tiny", with_past=False).parent, "--prompt", "hi", "--runtime", "genai")
    assert_one_line_error(no_cache, "no KV cache")
    eager = run_cli("generate", compiled_text_opt("W4A4KV"), "--prompt", "hi", "--runtime", "genai")
    assert_one_line_error(eager, "onnxruntime-genai cannot allocate", "--attention fused")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in exported("tiny").parent.iterdir():
        if f.name != GENAI_CONFIG_NAME:
            (bare / f.name).write_bytes(f.read_bytes())
    missing = run_cli("generate", bare, "--prompt", "hi", "--runtime", "genai")
    assert_one_line_error(missing, f"no {GENAI_CONFIG_NAME}")


def _graph(past_type: int, past_dims: list, layers: int = 2, positions: bool = False):
    """A stand-in graph with our I/O names (the nodes do not matter to genai_config)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    if positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 512])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", past_type, past_dims))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", past_type, past_dims))
    return helper.make_model(helper.make_graph([], "g", inputs, outputs))


def test_genai_config_from_the_graph_and_config(tmp_path):
    from onnx import TensorProto

    from rptq_onnx.errors import RptqError
    from rptq_onnx.genai import cache_layout, genai_config, write_genai_config

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.6,
                                                                 "do_sample": True}))
    packed = _graph(TensorProto.UINT8, ["batch", 2, "past", 8], positions=True)
    layout = cache_layout(packed)
    assert (layout.layers, layout.kv_heads, layout.width, layout.kind(16)) == (2, 2, 8, "int4 (two codes per byte, in uint8)")
    assert layout.bytes_per_token_per_layer == 32
    config = genai_config(packed, tmp_path)
    assert config["model"]["type"] == "mistral" and config["model"]["eos_token_id"] == [2, 7]
    assert config["model"]["pad_token_id"] == 2  # no pad id: the first EOS
    assert config["model"]["decoder"]["head_size"] == 16 and config["model"]["decoder"]["inputs"]["position_ids"]
    assert config["search"]["do_sample"] is True and config["search"]["temperature"] == 0.6
    assert cache_layout(_graph(TensorProto.INT8, ["batch", 2, "past", 16])).kind(16) == "int8"
    with pytest.raises(RptqError, match="onnxruntime-genai cannot allocate"):
        cache_layout(_graph(TensorProto.UINT4, ["batch", 32, "past"]))
    with pytest.raises(RptqError, match="no KV cache"):
        cache_layout(_graph(TensorProto.FLOAT, [], layers=0))
    assert not write_genai_config(_graph(TensorProto.FLOAT, [], layers=0), tmp_path)
    assert not (tmp_path / GENAI_CONFIG_NAME).exists()
    assert write_genai_config(packed, tmp_path) and (tmp_path / GENAI_CONFIG_NAME).is_file()


def test_bench_genai_pairs_each_round_with_the_anchor_of_the_same_round():
    """The round-by-round ratio pairs round i of ours with round i of the anchor (the shared machine's slow spells
    hit both), not fastest with fastest; one round gives no such ratio."""
    from rptq_onnx.tools.bench_genai import round_ratio

    ours, anchor = {"rounds": [12.0, 11.0, 15.6]}, {"rounds": [10.0, 10.0, 12.0]}
    assert round_ratio(ours, anchor) == " (round by round: median 1.20×, 1.10–1.30×)"
    assert min(ours["rounds"]) / min(anchor["rounds"]) == 1.1  # what fastest-vs-fastest would say
    assert round_ratio({"rounds": [12.0]}, {"rounds": [10.0]}) == ""
