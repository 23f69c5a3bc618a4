"""rptq_onnx/generate.py and `rptq-onnx generate`: decode loop, batching, sampling, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from rptq_onnx.errors import RptqError
from rptq_onnx.export import export
from rptq_onnx.generate import Generator, Sampling
from test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def fp_export(text_opt, tmp_path_factory):
    return export(str(text_opt), tmp_path_factory.mktemp("fp-past"), with_past=True).model_path.parent


@pytest.mark.slow
def test_left_padded_batch_matches_single_prompts(compiled_text):
    gen = Generator(compiled_text("W4A4KV"))
    prompts = ["The Congress", "In the course of the last year the nation has"]
    batch = gen.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    for i, prompt in enumerate(prompts):
        single = gen.generate([prompt], max_new_tokens=12, stop_at_eos=False)
        assert single.new_tokens[0] == batch.new_tokens[i]
    assert batch.cache.batch == 2 and len(batch.step_seconds) == 11


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50))
    greedy = Sampling().choose(logits, rng)
    assert (greedy == logits.argmax(-1)).all()
    assert (Sampling(do_sample=True, top_k=1).choose(logits, rng) == greedy).all()
    assert (Sampling(do_sample=True, top_p=1e-6).choose(logits, rng) == greedy).all()
    top3 = np.argsort(-logits, -1)[:, :3]
    picks = np.stack([Sampling(do_sample=True, top_k=3).choose(logits, np.random.default_rng(s)) for s in range(40)])
    assert all(set(picks[:, r]) <= set(top3[r]) for r in range(3))
    assert len(set(picks[:, 0])) > 1  # it does sample
    a = Sampling(do_sample=True, seed=3)
    assert (a.choose(logits, np.random.default_rng(3)) == a.choose(logits, np.random.default_rng(3))).all()
    with pytest.raises(RptqError):
        Sampling(temperature=0)


@pytest.mark.slow
def test_stops_at_positions_and_eos(compiled_text_opt):
    gen = Generator(compiled_text_opt("W4A4KV"))
    out = gen.generate_ids([list(range(5, 5 + gen.max_positions - 4))], max_new_tokens=10, stop_at_eos=False)
    assert out.truncated and len(out.new_tokens[0]) == 4
    first = int(gen.generate_ids([[5, 6, 7]], max_new_tokens=1).new_tokens[0][0])
    gen.stop_ids = [gen.eos_id, first]  # force an early stop, as a second EOS id would
    out = gen.generate_ids([[5, 6, 7]], max_new_tokens=10)
    assert out.new_tokens == [[]] and out.step_seconds == []


def test_stop_ids_include_generation_config(tmp_path):
    from rptq_onnx.generate import _stop_ids

    assert _stop_ids(2, tmp_path) == [2]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 128009]}')
    assert _stop_ids(2, tmp_path) == [2, 128009]  # e.g. Llama-3-Instruct's end of turn
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert _stop_ids(None, tmp_path) == [7]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp", "W4A4KV", "W8A8"])
def test_cli_generate(which, fp_export, compiled_text_opt):
    model = fp_export if which == "fp" else compiled_text_opt(which)
    proc = run_cli("generate", model, "--prompt", "The Congress", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The Congress") and len(proc.stdout.strip()) > len("The Congress")
    kind = {"fp": "float", "W4A4KV": "uint4", "W8A8": "uint8"}[which]
    assert f"cache {kind} held between steps" in proc.stderr


@pytest.mark.slow
def test_cli_generate_sampling_is_seeded(compiled_text_opt):
    args = ("generate", compiled_text_opt("W4A4KV"), "--prompt", "We", "--max-new-tokens", "8", "--do-sample",
            "--top-k", "20", "--seed", "5")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.slow
def test_cli_generate_bad_input(compiled_text_opt):
    assert_one_line_error(run_cli("generate", compiled_text_opt("W4A4KV", with_past=False), "--prompt", "x"),
                          "no KV cache", "--with-past")
    assert_one_line_error(run_cli("generate", compiled_text_opt("W4A4KV"), "--prompt", "  "), "prompt is empty")
    long = "the nation " * 300
    assert_one_line_error(run_cli("generate", compiled_text_opt("W4A4KV"), "--prompt", long), "positions", "shorten")
    assert_one_line_error(run_cli("generate", compiled_text_opt("W4A4KV"), "--prompt", "x", "--top-p", "0"), "--top-p")
