"""The bundled demo OPT: default compile target, ORT perplexity = torch, quality ordering of presets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptq_onnx.bundled import DEMO_MODEL_DIR
from rptq_onnx.compile import compile_model
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.evaluate import load_text, perplexity
from rptq_onnx.export import export
from test_cli import run_cli

SEQLEN, WINDOWS = 256, 12
TEXT = load_text("sotu-test")


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    return export(str(DEMO_MODEL_DIR), tmp_path_factory.mktemp("demo") / "fp", with_past=False).model_path


def test_demo_checkpoint_is_small_and_pre_ln():
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["do_layer_norm_before"] is True
    assert sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir()) < 25 * 2**20


@pytest.mark.slow
def test_ort_perplexity_equals_torch_on_the_demo(demo_onnx):
    res = perplexity(demo_onnx, TEXT, seqlen=SEQLEN, max_tokens=SEQLEN * WINDOWS, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL_DIR), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))(TEXT, add_special_tokens=False)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for i in range(WINDOWS):
            w = torch.tensor(ids[i * SEQLEN:(i + 1) * SEQLEN])[None]
            total += model(input_ids=w, labels=w).loss.item() * (SEQLEN - 1)
    ref = math.exp(total / (WINDOWS * (SEQLEN - 1)))
    assert abs(res.perplexity - ref) <= 0.005 * ref


@pytest.mark.slow
def test_compile_without_model_uses_the_bundled_demo(tmp_path):
    proc = run_cli("compile", "-o", tmp_path / "out", "--preset", "W4A4KV", "--nsamples", 2, "--seqlen", 64,
                   "--weight-quant", "rtn", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source"] == str(DEMO_MODEL_DIR) and report["calibration"]["source"] == "sotu-train"


@pytest.mark.slow
def test_quality_ordering_on_a_few_windows(demo_onnx, tmp_path):
    """A reduced tools/bench_quality.py: its calibration (32 × 256 of sotu-train), 64 test windows."""
    calib = CalibConfig(source="sotu-train", nsamples=32, seqlen=SEQLEN)
    windows = 64

    def ppl(path):
        return perplexity(path, TEXT, seqlen=SEQLEN, max_tokens=SEQLEN * windows, progress=False).perplexity

    def compiled(name, preset, clusters=None):
        cfg = CompileConfig(preset=preset, quant=QuantSpec.for_preset(preset), calib=calib,
                            clusters=clusters or ClusterCounts())
        return ppl(compile_model(str(demo_onnx), tmp_path / name, cfg, progress=False).model_path)

    fp, w8a8, w4a4 = ppl(demo_onnx), compiled("w8a8", "W8A8"), compiled("w4a4", "W4A4")
    one_cluster = compiled("w4a4-k1", "W4A4", ClusterCounts.parse("all=1"))  # per tensor, per head at q/k/v
    assert fp <= w8a8 <= w4a4, (fp, w8a8, w4a4)
    assert w4a4 < one_cluster, (w4a4, one_cluster)
