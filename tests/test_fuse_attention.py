"""passes/fuse_attention.py: eager attention → one GroupQueryAttention per layer over a low-bit cache.

The fused graph must compute what the eager graph computes over the same K/V grid (zero points
folded into biases for V and OPT's K; Llama's K symmetric in both), and cached decoding must equal
recomputation of the whole sequence.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import rptq_onnx.quantize as quantize
from rptq_onnx.compile import compile_model
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.generate import Generator
from test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # every test here exports or compiles a model


def _compile(source, out, preset, attention, **quant):
    config = CompileConfig(preset=preset, quant=QuantSpec.for_preset(preset, weight_quant="rtn", **quant),
                           calib=CalibConfig(source="sotu-train", nsamples=4, seqlen=64),
                           clusters=ClusterCounts(R1=8, R4=8, R5=8), attention=attention)
    return compile_model(str(source), out, config, progress=False)


def _run(model_dir, ids, mask, steps=3):
    """Logits of a (left-padded) prefill and ``steps`` greedy decode steps: list of [B, S, V]."""
    gen = Generator(model_dir)
    logits, past = gen.step(ids, mask, gen.empty_past(ids.shape[0]), all_logits=True)
    out = [logits]
    for _ in range(steps):
        nxt = np.argmax(out[-1][:, -1], -1)[:, None]
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        logits, past = gen.step(nxt, mask, past, all_logits=True)
        out.append(logits)
    return out, gen.cache_type


def _batch(vocab=500):
    ids = np.random.default_rng(0).integers(4, vocab, (2, 20))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # the second prompt is left-padded by 5
    return ids, mask


def _assert_same(eager, fused, rows=(0, 1)):
    for step, (a, b) in enumerate(zip(eager, fused)):
        a, b = a[list(rows)], b[list(rows)]
        valid = np.ones(a.shape[:2], bool)
        if step == 0 and 1 in rows:
            valid[rows.index(1), :5] = False  # padded positions: garbage in both
        assert np.abs(a - b)[valid].max() <= 1e-4 * np.abs(a).max(), step
        assert (a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).all()


@pytest.mark.parametrize("preset,abits,cache", [("W4A4KV", None, "tensor(uint8)"), ("W4A4KV", 8, "tensor(int8)"),
                                                ("W4A16", None, "tensor(float)")])
def test_fused_equals_eager_opt(text_opt, tmp_path, preset, abits, cache):
    quant = {"abits": abits} if abits else {}
    ids, mask = _batch()
    eager, _ = _run(_compile(text_opt, tmp_path / "eager", preset, "eager", **quant).model_path.parent, ids, mask)
    result = _compile(text_opt, tmp_path / "fused", preset, "fused", **quant)
    fused, cache_type = _run(result.model_path.parent, ids, mask)
    assert cache_type == cache
    ops = [n.op_type for n in onnx.load(result.model_path).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    assert result.report.quantization.attention.qkv_packed == 2  # q/k/v as one MatMulNBits per layer
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # qkv, out_proj, fc1, fc2 per layer, and the 8-bit head
    if preset.endswith("KV"):  # V and K offsets folded into the biases (OPT has them all)
        assert result.report.quantization.attention.offsets_folded == 4
    _assert_same(eager, fused)


def test_fused_equals_eager_llama_over_a_symmetric_key(text_llama, tmp_path, monkeypatch):
    """Llama's K after RoPE is symmetric when fused; the eager graph over that same grid gives the same logits.

    GQA applies RoPE itself, at positions from the sequence lengths: the left-padded row is rotated
    shifted by its padding, so its 4-bit K codes differ and only the unpadded row is compared."""
    ids, mask = _batch()
    result = _compile(text_llama, tmp_path / "fused", "W4A4KV", "fused")
    fused, cache_type = _run(result.model_path.parent, ids, mask)
    assert cache_type == "tensor(uint8)"
    attention = result.report.quantization.attention
    assert attention.bias_adds == 2  # no v_proj bias in Llama (o_proj's offset goes into its kernel's bias)
    assert attention.norms_fused == 2 * 2 + 1  # passes/fuse_norms.py
    assert attention.rotary_in_kernel == 2 and attention.qkv_packed == 2
    graph = onnx.load(result.model_path)
    ops = [n.op_type for n in graph.graph.node]
    assert "Neg" not in ops and "Transpose" not in ops, "RoPE and the head layout are inside GQA"
    assert "position_ids" not in {i.name for i in graph.graph.input}
    monkeypatch.setattr(quantize, "symmetric_key", lambda layer, config: layer.q_rope is not None)
    eager, _ = _run(_compile(text_llama, tmp_path / "eager", "W4A4KV", "eager").model_path.parent, ids, mask)
    _assert_same(eager, fused, rows=(0,))


def test_rope_inside_gqa_equals_eager_rope_on_a_padded_batch_with_a_float_cache(text_llama, tmp_path):
    """With a float cache the shifted rotation of a left-padded row changes nothing (RoPE is relative)."""
    ids, mask = _batch()
    result = _compile(text_llama, tmp_path / "fused", "W4A16", "fused")
    assert result.report.quantization.attention.rotary_in_kernel == 2
    fused, cache_type = _run(result.model_path.parent, ids, mask)
    assert cache_type == "tensor(float)"
    eager, _ = _run(_compile(text_llama, tmp_path / "eager", "W4A16", "eager").model_path.parent, ids, mask)
    _assert_same(eager, fused)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("preset", ["W4A4KV", "W4A3KV", "W3A3KV"])
def test_fused_cached_decoding_equals_recomputation(text_opt, text_llama, tmp_path, family, preset):
    source = text_opt if family == "opt" else text_llama
    result = _compile(source, tmp_path / "fused", preset, "fused")
    model_dir = result.model_path.parent
    # RoPE inside GQA where nothing sits between it and the kernel; a 3-bit K keeps its Q/DQ there
    attention = result.report.quantization.attention
    assert attention.rotary_in_kernel == (2 if family == "llama" and preset == "W4A4KV" else 0)
    assert attention.qkv_packed == (2 if preset == "W4A4KV" else 0)
    ids = np.random.default_rng(1).integers(4, 500, (1, 12))
    steps, _ = _run(model_dir, ids, np.ones_like(ids), steps=4)
    tokens = np.concatenate([ids] + [s[:, -1].argmax(-1)[:, None] for s in steps[:-1]], axis=1)
    gen = Generator(model_dir)
    full, _ = gen.step(tokens, np.ones_like(tokens), gen.empty_past(1), all_logits=True)
    for k, step in enumerate(steps[1:]):
        ref = full[:, ids.shape[1] + k]
        assert np.abs(step[:, -1] - ref).max() <= 1e-4 * np.abs(ref).max(), k


def test_fused_where_it_cannot_apply_is_one_line(text_opt, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compile", text_opt, "-o", out, "--preset", "W4A4", "--calib", "random", "--attention", "fused")
    assert_one_line_error(proc, "--attention fused cannot apply", "softmax output P")
    assert not out.exists()
    proc = run_cli("compile", text_opt, "-o", out, "--preset", "W4A4KV", "--calib", "random", "--attention", "fused",
                   "--no-past")
    assert_one_line_error(proc, "--attention fused needs a graph with a KV cache")
    assert not out.exists()


def test_gpu_check_runs_and_says_so_without_cuda(exported, capsys):
    """tools/gpu_check.py: without a CUDA device it says so and runs placement and decode timing on the CPU."""
    from rptq_onnx.tools.gpu_check import main

    assert main(["--model", str(exported("tiny")), "--sizes", "1x16", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "CUDA device: absent" in out
    assert "GroupQueryAttention (real)" in out and "W4A4KV fused" in out


def test_cli_generate_says_the_fused_cache_is_int4(text_opt, tmp_path):
    model_dir = _compile(text_opt, tmp_path / "fused", "W4A4KV", "fused").model_path.parent
    proc = run_cli("generate", model_dir, "--prompt", "The Congress", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "cache int4 (two codes per byte, in uint8) held between steps" in proc.stderr
    table = run_cli("inspect", model_dir)
    assert table.returncode == 0, table.stderr
    assert "attention fused into com.microsoft:GroupQueryAttention" in table.stdout and "KV cache  int4" in table.stdout
    assert "R1 not clustered" in table.stdout and "R2 k=" in table.stdout  # KV presets cluster only R2/R3
