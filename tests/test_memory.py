"""rptq_onnx/memory.py and `rptq-onnx memory`: the paper's memory breakdown, pinned on a hand-computed case."""

from __future__ import annotations

import re

import pytest

from rptq_onnx.errors import RptqError
from rptq_onnx.memory import OPT_CONFIGS, OptShape, memory
from test_cli import assert_one_line_error, run_cli


def test_hand_computed_small_case():
    # 2 layers, hidden 8, 2 heads, ffn 32, vocab 10, 6 positions
    s = OptShape(layers=2, hidden=8, heads=2, ffn=32, vocab=10, positions=6)
    assert s.linear_params == 2 * (4 * 64 + 2 * 8 * 32)  # 1536
    assert s.linear_out_channels == 2 * (4 * 8 + 32 + 8)  # 144
    # embeddings 80, positions (6+2)·8 = 64, per layer 2 LNs (32) + q/k/v/o biases (32) + fc1 (32) + fc2 (8)
    # bias = 104, final LN 16
    assert s.other_params == 80 + 64 + 2 * 104 + 16
    m = memory(s, "W4A4", batch=3, seqlen=5)
    assert m.weights == 1536 * 4 / 8 + 144 * 4 + 368 * 2  # 768 + 576 + 736
    assert m.kv_cache == 2 * 2 * 3 * 5 * 8 * 4 / 8  # 240
    assert m.activations == 3 * 5 * 32 * 4 / 8  # 240
    assert m.total == 2080 + 240 + 240
    kv = memory(s, "W4A3KV", batch=3, seqlen=5)
    assert (kv.abits, kv.kvbits) == (16, 3) and kv.activations == 3 * 5 * 32 * 2
    fp = memory(s, "FP16", 3, 5)
    assert fp.weights == (1536 + 368) * 2 and fp.kv_cache == 2 * 2 * 3 * 5 * 8 * 2


def test_published_parameter_counts():
    assert abs(OPT_CONFIGS["opt-125m"].linear_params + OPT_CONFIGS["opt-125m"].other_params - 125.2e6) < 0.1e6
    s = OPT_CONFIGS["opt-66b"]
    assert 65e9 < s.linear_params + s.other_params < 66.5e9


@pytest.mark.slow
def test_paper_claim_opt66b_w4a4_saves_over_900_gb():
    proc = run_cli("memory", "opt-66b", "--batch", "64", "--seqlen", "8192")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache = 2 × layers × batch × seqlen × hidden × kv/8 = 2 × 64 × 64 × 8192 × 9216" in proc.stdout
    saved = re.search(r"W4A4 vs W4A16: .* saves ([\d,.]+) GB", proc.stdout)
    assert saved and float(saved.group(1).replace(",", "")) > 900
    s = OPT_CONFIGS["opt-66b"]
    assert memory(s, "W4A16", 64, 8192).total - memory(s, "W4A4", 64, 8192).total > 900e9


@pytest.mark.slow
def test_bad_input():
    assert_one_line_error(run_cli("memory", "opt-7b"), "opt-66b")
    with pytest.raises(RptqError):
        memory(OPT_CONFIGS["opt-125m"], "W5A5", 1, 1)
    assert_one_line_error(run_cli("memory", "opt-125m", "--batch", "0"), "--batch")


@pytest.mark.slow
def test_llama_shape_counts_gqa_cache_and_three_mlp_linears():
    from rptq_onnx.memory import LLAMA_CONFIGS, LlamaShape, resolve_shape

    # 2 layers, hidden 8, 4 query heads of 4 (16 channels), 1 K/V head, ffn 12, vocab 10, tied
    s = LlamaShape(layers=2, hidden=8, heads=4, ffn=12, kv_heads=1, head_dim=4, vocab=10)
    assert s.kv_channels == 4
    assert s.linear_params == 2 * (2 * 8 * 16 + 2 * 8 * 4 + 3 * 8 * 12)  # q, o; k, v; gate, up, down = 1216
    assert s.linear_out_channels == 2 * (16 + 8 + 8 + 24 + 8)  # 128
    assert s.other_params == 80 + 5 * 8  # tied embedding, 2 RMSNorms per layer + the final one
    m = memory(s, "W4A4KV", batch=3, seqlen=5)
    assert m.kv_cache == 2 * 2 * 3 * 5 * 4 * 4 / 8  # only the K/V heads are cached
    assert m.weights == 1216 * 4 / 8 + 128 * 4 + 120 * 2
    smol = LLAMA_CONFIGS["smollm2-135m"]
    assert 134e6 < smol.linear_params + smol.other_params < 135e6
    assert resolve_shape("smollm2") == smol  # the name export/compile take
    proc = run_cli("memory", "smollm2-135m", "--batch", "1", "--seqlen", "8192")
    assert proc.returncode == 0, proc.stderr
    assert "kv_heads × head_dim × kv/8 = 2 × 30 × 1 × 8192 × 192" in proc.stdout


def test_three_bit_codes_are_costed_as_stored():
    """3-bit weights and caches live in 4-bit containers: W3A3KV costs what W4A4KV costs."""
    from rptq_onnx.memory import memory, resolve_shape

    shape = resolve_shape("opt-125m")
    w3, w4 = memory(shape, "W3A3KV", batch=2, seqlen=64), memory(shape, "W4A4KV", batch=2, seqlen=64)
    assert (w3.weights, w3.kv_cache) == (w4.weights, w4.kv_cache)
    assert w3.wbits == 3 and w3.kvbits == 3
