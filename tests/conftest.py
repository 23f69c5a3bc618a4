"""Shared fixtures: seeded random OPT / Llama directories and their ONNX exports, built once per session."""

from __future__ import annotations

import os

import pytest

from rptq_onnx.export import export
from rptq_onnx.models import save_random_llama, save_random_opt

# A chat template for the tiny test tokenizer (the SmolLM2 one has the same shape).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")

# Three different small configs (layers / hidden / heads / ffn), plus the tiny default.
CONFIGS = {
    "tiny": dict(),
    "l1h32": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, ffn_dim=64),
    "l3h96": dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, ffn_dim=384),
    "l2h128": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=8, ffn_dim=256),
}


@pytest.fixture(scope="session", autouse=True)
def _private_export_cache(tmp_path_factory):
    """The demo-export cache (rptq_onnx/export_cache.py) in a fresh directory for this session, also for
    CLI subprocesses: tests never read or fill the user's cache."""
    os.environ["RPTQ_ONNX_CACHE_DIR"] = str(tmp_path_factory.mktemp("export-cache"))
    os.environ.pop("RPTQ_ONNX_NO_CACHE", None)


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory):
    """``opt_dir(name) -> Path`` of a saved random OPT with CONFIGS[name] (cached)."""
    cache = {}

    def get(name: str = "tiny", seed: int = 0):
        key = (name, seed)
        if key not in cache:
            cache[key] = save_random_opt(tmp_path_factory.mktemp(f"hf-{name}"), seed=seed, **CONFIGS[name])
        return cache[key]

    return get


@pytest.fixture(scope="session")
def exported(opt_dir, tmp_path_factory):
    """``exported(name, with_past=True, exporter="dynamo") -> Path`` of model.onnx (cached)."""
    cache = {}

    def get(name: str = "tiny", with_past: bool = True, exporter: str = "dynamo"):
        key = (name, with_past, exporter)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{name}-{exporter}")
            cache[key] = export(str(opt_dir(name)), out, with_past=with_past, exporter=exporter).model_path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def opt125m(tmp_path_factory):
    """(HF dir, with-past model.onnx) of a random OPT with the opt-125m shapes (exported once)."""
    from rptq_onnx.models import OPT_125M_SHAPES

    root = tmp_path_factory.mktemp("opt125m")
    model_dir = save_random_opt(root / "hf", seed=0, **OPT_125M_SHAPES)
    return model_dir, export(str(model_dir), root / "onnx", with_past=True).model_path


@pytest.fixture(scope="session")
def text_opt(tmp_path_factory):
    """A tiny random OPT directory with a small BPE tokenizer (for text calibration and generation)."""
    return save_random_opt(tmp_path_factory.mktemp("hf-text"), seed=1, tokenizer=True)


@pytest.fixture(scope="session")
def text_llama(tmp_path_factory):
    """A tiny random Llama (GQA, RoPE, SwiGLU) with a small BPE tokenizer that has a chat template."""
    from transformers import AutoTokenizer

    out = save_random_llama(tmp_path_factory.mktemp("hf-text-llama"), seed=1, tokenizer=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return out


def _compiled(source, tmp_path_factory, tag):
    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, CompileConfig, QuantSpec

    cache, exports = {}, {}

    def get(preset: str, with_past: bool = True, **quant):
        key = (preset, with_past, tuple(sorted(quant.items())))
        if with_past not in exports:  # export once per cache layout; every compile starts from it
            exports[with_past] = export(str(source), tmp_path_factory.mktemp(f"{tag}-onnx"), with_past=with_past).model_path
        if key not in cache:
            config = CompileConfig(preset=preset, calib=CalibConfig(source="sotu-train", nsamples=4, seqlen=64),
                                   quant=QuantSpec.for_preset(preset, weight_quant="rtn", **quant))
            out = tmp_path_factory.mktemp(f"{tag}-{preset}")
            cache[key] = compile_model(str(exports[with_past]), out, config, progress=False).model_path.parent
        return cache[key]

    return get


@pytest.fixture(scope="session")
def compiled_text_opt(text_opt, tmp_path_factory):
    """``compiled_text_opt(preset, with_past=True, **quant) -> Path`` of a compiled model dir (cached)."""
    return _compiled(text_opt, tmp_path_factory, "opt")


@pytest.fixture(scope="session")
def compiled_text_llama(text_llama, tmp_path_factory):
    """``compiled_text_llama(preset, with_past=True, **quant) -> Path``, as ``compiled_text_opt`` for the tiny Llama."""
    return _compiled(text_llama, tmp_path_factory, "llama")


@pytest.fixture(params=["opt", "llama"])
def compiled_text(request):
    """``compiled_text_opt`` and ``compiled_text_llama`` in turn: a test of behaviour both families share."""
    return request.getfixturevalue(f"compiled_text_{request.param}")
