"""The CLI end to end: success paths print what users need; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rptq_onnx.models import save_random_opt


def run_cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rptq_onnx", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rptq-onnx: error: ")
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.mark.slow
def test_export_then_inspect(opt_dir, tmp_path):
    out = tmp_path / "onnx"
    proc = run_cli("export", opt_dir("l2h128"), "-o", out, "--no-past")
    assert proc.returncode == 0, proc.stderr
    assert "→" in proc.stdout and (out / "model.onnx").is_file()
    table = run_cli("inspect", out / "model.onnx")
    assert table.returncode == 0, table.stderr
    assert "R1 attn-norm out" in table.stdout and "8×16" in table.stdout
    js = run_cli("inspect", out / "model.onnx", "--json")
    desc = json.loads(js.stdout)
    assert desc["num_layers"] == 2 and desc["with_past"] is False
    assert set(desc["layers"][0]["points"]) == {"R1", "R2", "R3", "R4", "R5"}
    assert desc["initializer_bytes"]["float"] > 0


@pytest.mark.slow
def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("inspect", tmp_path / "nope.onnx"), "no such file")
    assert_one_line_error(run_cli("export", tmp_path / "nope", "-o", tmp_path / "o"), "no such directory")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_truncated_onnx(exported, tmp_path):
    data = exported("tiny").read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 3])
    assert_one_line_error(run_cli("inspect", bad), "cut.onnx", "truncated")


@pytest.mark.slow
def test_compiling_a_compiled_model(compiled_text_opt, tmp_path):
    model = compiled_text_opt("W4A4KV") / "model.onnx"
    before = model.read_bytes()
    proc = run_cli("compile", model, "-o", tmp_path / "again", "--preset", "W4A4", "--calib", "random")
    assert_one_line_error(proc, "was already compiled by rptq-onnx", "compile the exported model")
    assert not (tmp_path / "again").exists() and model.read_bytes() == before


@pytest.mark.slow
def test_output_into_the_input_directory(exported, tmp_path):
    model = exported("tiny")
    before = sorted((p.name, p.read_bytes()) for p in model.parent.iterdir())
    proc = run_cli("compile", model, "-o", model.parent, "--calib", "random")
    assert_one_line_error(proc, "is the directory of the input model", "choose another output directory")
    assert sorted((p.name, p.read_bytes()) for p in model.parent.iterdir()) == before


@pytest.mark.slow
def test_post_ln_config(tmp_path):
    src = save_random_opt(tmp_path / "post", do_layer_norm_before=False, num_hidden_layers=1)
    proc = run_cli("export", src, "-o", tmp_path / "out")
    assert_one_line_error(proc, "post-LN", "do_layer_norm_before=False")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_non_opt_config(tmp_path):
    from transformers import GPT2Config

    src = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(src)
    proc = run_cli("export", src, "-o", tmp_path / "out")
    assert_one_line_error(proc, "model_type 'gpt2' is not supported")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_hub_id_offline(tmp_path):
    proc = run_cli("export", "facebook/opt-125m", "-o", tmp_path / "out")
    assert_one_line_error(proc, "facebook/opt-125m", "hub")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("export", tmp_path / "empty", "-o", tmp_path / "out"), "no config.json")


@pytest.mark.slow
@pytest.mark.parametrize("opset", ["12", "30"])
def test_bad_opset(opt_dir, tmp_path, opset):
    assert_one_line_error(run_cli("export", opt_dir("tiny"), "-o", tmp_path / "out", "--opset", opset), "--opset")


@pytest.mark.slow
@pytest.mark.parametrize("args,msg", [(["eval", "MODEL", "--seqlen", "1"], "--seqlen 1: a window needs ≥ 2 tokens"),
                                      (["eval", "MODEL", "--batch-size", "0"], "--batch-size 0: must be ≥ 1"),
                                      (["eval", "MODEL", "--max-tokens", "0"], "--max-tokens 0: must be ≥ 2"),
                                      (["eval", "MODEL", "--cloze", "-5"], "--cloze -5: must be ≥ 0"),
                                      (["generate", "MODEL", "--prompt", "x", "--seed", "-1"], "--seed -1: must be ≥ 0"),
                                      (["inspect", "MODEL", "--ranges", "out.txt"], "give a path ending in .png")])
def test_bad_numbers_and_plot_paths(exported, args, msg):
    args = [exported("tiny") if a == "MODEL" else a for a in args]
    assert_one_line_error(run_cli(*args), msg)


@pytest.mark.slow
def test_export_over_a_compiled_directory_leaves_no_compile_files(compiled_text_opt, text_opt, tmp_path):
    import shutil

    out = tmp_path / "reused"
    shutil.copytree(compiled_text_opt("W4A4KV"), out)
    (out / "mine.txt").write_text("keep")
    assert run_cli("export", text_opt, "-o", out).returncode == 0
    assert not any((out / n).exists() for n in ("clusters.json", "ranges.safetensors", "report.json"))
    assert (out / "mine.txt").read_text() == "keep" and (out / "export.json").is_file()
