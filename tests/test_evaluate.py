"""`rptq-onnx eval`: ORT perplexity equals torch's; bad texts are one-line errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptq_onnx.evaluate import load_text, perplexity
from rptq_onnx.export import export
from rptq_onnx.models import save_random_opt, train_bpe_tokenizer
from test_cli import assert_one_line_error, run_cli

TEXT = load_text("sotu-test")[:60000]


@pytest.fixture(scope="module")
def tokenized_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-model")
    hf = save_random_opt(root / "hf", seed=4, vocab_size=400)
    train_bpe_tokenizer([TEXT], vocab_size=400).save_pretrained(str(hf))
    onnx_path = export(str(hf), root / "onnx", with_past=True).model_path
    return hf, onnx_path


def _torch_ppl(model_dir, text, seqlen):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(str(model_dir))(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // seqlen
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen:(i + 1) * seqlen][None]
            total += model(input_ids=w, labels=w).loss.item() * (seqlen - 1)
    return math.exp(total / (n * (seqlen - 1)))


@pytest.mark.slow
def test_ort_perplexity_equals_torch(tokenized_model):
    hf, onnx_path = tokenized_model
    res = perplexity(onnx_path, TEXT, seqlen=64, batch_size=3, progress=False)
    ref = _torch_ppl(hf, TEXT, 64)
    assert abs(res.perplexity - ref) <= 0.005 * ref
    assert res.tokens == res.windows * 63


@pytest.mark.slow
def test_eval_cli(tokenized_model, tmp_path):
    _, onnx_path = tokenized_model
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    proc = run_cli("eval", onnx_path, "--text", text, "--seqlen", 64, "--max-tokens", 2000, "-q")
    assert proc.returncode == 0, proc.stderr
    assert float(re.search(r"perplexity ([0-9.]+)", proc.stdout).group(1)) > 1


@pytest.mark.slow
@pytest.mark.parametrize("content,args,msg", [("", [], "fewer than one window"), ("Short text.", [], "fewer than one window"),
                                               (None, [], "binary"), ("x " * 5000, ["--seqlen", "4096"], "positions")])
def test_bad_eval_input(tokenized_model, tmp_path, content, args, msg):
    _, onnx_path = tokenized_model
    path = tmp_path / "bad.txt"
    if content is None:
        path.write_bytes(b"\x00\xff" * 500)
    else:
        path.write_text(content)
    assert_one_line_error(run_cli("eval", onnx_path, "--text", path, "--seqlen", 64, *args), msg)


@pytest.mark.slow
def test_hf_dataset_name_offline_is_one_line(tokenized_model):
    _, onnx_path = tokenized_model
    assert_one_line_error(run_cli("eval", onnx_path, "--text", "wikitext2"), "wikitext2")


@pytest.mark.slow
def test_cloze_items_and_accuracy(tokenized_model):
    from rptq_onnx.evaluate import cloze_accuracy, cloze_examples

    hf, onnx_path = tokenized_model
    tok = AutoTokenizer.from_pretrained(str(hf))
    items = cloze_examples(tok, TEXT, examples=30, context=64)
    assert len(items) == 30 and all(0 < len(ctx) <= 64 for ctx, _ in items)
    for ctx, target in items:
        word = tok.decode(target).strip()
        assert word.isalpha() and len(word) >= 4
        assert tok.decode(ctx) in TEXT  # the context is the text right before the word
    assert cloze_examples(tok, TEXT, examples=30, context=64) == items  # deterministic
    res = cloze_accuracy(onnx_path, TEXT, examples=30, context=64, progress=False)
    assert res.examples == 30 and 0 <= res.accuracy <= 1


def test_max_tokens_tokenizes_a_prefix_with_the_same_ids(monkeypatch):
    """`eval --max-tokens N` tokenizes a prefix of the text, not all of it, and gets the same first N
    ids as the whole text gives (bundled tokenizer, sotu-test; cuts at line ends)."""
    import numpy as np

    from rptq_onnx import evaluate
    from rptq_onnx.bundled import DEMO_MODEL_DIR, text_path
    from rptq_onnx.text import load_tokenizer, token_ids

    text = text_path("sotu-test").read_text()
    whole = token_ids(text, DEMO_MODEL_DIR)
    tokenizer, seen = load_tokenizer(DEMO_MODEL_DIR), []

    def recording(t, **kwargs):
        seen.append(len(t))
        return tokenizer(t, **kwargs)

    monkeypatch.setattr(evaluate, "load_tokenizer", lambda model_dir: recording)
    for n in (2, 1000, 65536, len(whole) + 10):
        seen.clear()
        np.testing.assert_array_equal(evaluate.leading_token_ids(text, DEMO_MODEL_DIR, n), whole[:n])
        if n <= 65536:
            assert 0 < max(seen) < len(text) // 2


def test_heldout_python_docs_text_is_prose_and_stable():
    from rptq_onnx.heldout import heldout_text
    from rptq_onnx.text import read_text

    text = read_text("python-docs", flag="--text")
    assert text == heldout_text("python-docs")  # same bytes each time
    paragraphs = text.strip().split("\n\n")
    assert len(paragraphs) > 500 and len(text.split()) > 20_000
    assert not any(p.startswith((" ", ">>>")) or "::=" in p for p in paragraphs)  # no code or grammar
    assert heldout_text("sotu-test") is None
