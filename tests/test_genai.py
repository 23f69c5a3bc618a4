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
    assert ("position_ids" in decoder["inputs"]) == (family == "llama")
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
