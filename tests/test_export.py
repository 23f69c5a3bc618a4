"""`rptq-onnx export`: ORT output equals torch for prefill and decode; files and record written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rptq_onnx.export import export
from rptq_onnx.inspection import describe
from rptq_onnx.runtime import make_session


def _torch_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()


def _check_prefill_and_decode(model_dir, onnx_path, batch=2, prompt=7, tol=1e-4):
    """Prefill ``prompt`` tokens (past length 0), then one decode step with the past: ORT vs torch."""
    hf = _torch_model(model_dir)
    cfg = hf.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    sess = make_session(onnx_path, optimization="all")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=gen)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, use_cache=True)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    empty = np.zeros((batch, heads, 0, head_dim), np.float32)
    for i in range(cfg.num_hidden_layers):
        feed[f"past_key_values.{i}.key"] = empty
        feed[f"past_key_values.{i}.value"] = empty
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feed)))
    scale = float(np.abs(ref.logits.numpy()).max())
    assert np.abs(out["logits"] - ref.logits.numpy()).max() <= tol * max(scale, 1.0)
    for i, layer in enumerate(ref.cache.layers[: cfg.num_hidden_layers]):
        np.testing.assert_allclose(out[f"present.{i}.key"], layer.keys.numpy(), atol=tol, rtol=0)
        np.testing.assert_allclose(out[f"present.{i}.value"], layer.values.numpy(), atol=tol, rtol=0)

    # one decode step with the past produced by ORT
    nxt = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
    mask2 = torch.ones(batch, prompt + 1, dtype=torch.int64)
    with torch.no_grad():
        ref2 = hf(input_ids=nxt, attention_mask=mask2, cache=ref.cache, use_cache=True)
    feed2 = {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy()}
    for i in range(cfg.num_hidden_layers):
        feed2[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
        feed2[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    out2 = dict(zip(names, sess.run(None, feed2)))
    assert out2["logits"].shape == (batch, 1, cfg.vocab_size)
    assert np.abs(out2["logits"] - ref2.logits.numpy()).max() <= tol * max(scale, 1.0)
    assert out2["present.0.key"].shape == (batch, heads, prompt + 1, head_dim)
    for i, layer in enumerate(ref2.cache.layers[: cfg.num_hidden_layers]):
        np.testing.assert_allclose(out2[f"present.{i}.key"], layer.keys.numpy(), atol=tol, rtol=0)
        np.testing.assert_allclose(out2[f"present.{i}.value"], layer.values.numpy(), atol=tol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_with_past_matches_torch(opt_dir, exported, exporter):
    _check_prefill_and_decode(opt_dir("tiny"), exported("tiny", True, exporter))


@pytest.mark.slow
def test_no_past_matches_torch(opt_dir, exported):
    path = exported("l3h96", with_past=False)
    hf = _torch_model(opt_dir("l3h96"))
    ids = torch.randint(0, hf.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    sess = make_session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    (logits,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_export_writes_record_and_tokenizer_files(opt_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in opt_dir("l1h32").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    out = tmp_path / "out"
    result = export(str(src), out, with_past=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "genai_config.json",
                                                     "generation_config.json", "model.onnx", "tokenizer.json"]
    record = json.loads((out / "export.json").read_text())
    assert record["model_type"] == "opt" and record["opset"] == 21 and record["with_past"] is True
    assert record["config"]["num_hidden_layers"] == 1
    assert [i["name"] for i in record["inputs"]] == ["input_ids", "attention_mask", "past_key_values.0.key",
                                                    "past_key_values.0.value"]
    assert [o["name"] for o in record["outputs"]] == ["logits", "present.0.key", "present.0.value"]
    assert result.model_path == out / "model.onnx"
    # the input model is never modified, and no staging directory is left behind
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.slow
def test_opt125m_shapes_export_matches_torch_and_maps_12_layers(opt125m):
    model_dir, path = opt125m
    _check_prefill_and_decode(model_dir, path, batch=2, prompt=32)
    desc = describe(path)
    assert desc["num_layers"] == 12
    assert all(layer["num_heads"] == 12 and layer["head_dim"] == 64 for layer in desc["layers"])
    assert all(layer["point_channels"] == {"R1": 768, "R2": 768, "R3": 768, "R4": 768, "R5": 3072}
               for layer in desc["layers"])


@pytest.mark.slow
def test_exporter_failure_is_one_error_and_writes_nothing(opt_dir, tmp_path, monkeypatch):
    from rptq_onnx import export as export_module
    from rptq_onnx.errors import RptqError

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::foo\n  long torch.export trace ...")

    monkeypatch.setattr(export_module, "to_onnx", broken)
    with pytest.raises(RptqError, match=r"dynamo exporter failed \(Unsupported operator aten::foo\); try --exporter torchscript"):
        export(str(opt_dir("l1h32")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_staged_output_replaces_what_it_owns_and_keeps_the_rest(tmp_path):
    from rptq_onnx.graph import replaced_atomically, staged_output

    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.onnx", "model.onnx.data", "report.md", "notes.txt"):
        (out / name).write_text("old")
    (out / "report").mkdir()
    with staged_output(out, owns=("model.onnx", "model.onnx.data", "report.md", "report")) as stage:
        (stage / "model.onnx").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt"]  # no stale .data or report
    assert (out / "model.onnx").read_text() == "new" and (out / "notes.txt").read_text() == "old"
    with pytest.raises(RuntimeError), staged_output(out, owns=("model.onnx",)) as stage:
        (stage / "model.onnx").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "model.onnx").read_text() == "new"  # a failed run leaves the output as it was
    with pytest.raises(RuntimeError), replaced_atomically(out / "notes.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "notes.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and len(list(out.iterdir())) == 2
