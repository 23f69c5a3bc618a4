"""`rptq-onnx compile --preset reorder`: outputs, text calibration, determinism, one-line errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rptq_onnx.models import save_random_opt, train_bpe_tokenizer
from test_cli import assert_one_line_error, run_cli

TEXT = " ".join(
    f"Fellow citizens, in the year {1800 + i} the Congress met to consider the state of the union, "
    f"the budget of {i * 7} million dollars and the peace of nations." for i in range(60))


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok-model")
    model_dir = save_random_opt(root / "hf", seed=3)
    train_bpe_tokenizer([TEXT], vocab_size=300).save_pretrained(str(model_dir))
    text = root / "calib.txt"
    text.write_text(TEXT)
    return model_dir, text


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_compile_from_hf_dir_with_text_calibration(model_with_tokenizer, tmp_path):
    model_dir, text = model_with_tokenizer
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_cli("compile", model_dir, "-o", out, "--calib", text, "--nsamples", 4, "--seqlen", 32,
                       "--clusters", "R1=8,R4=8,R5=16", "--layout", "contiguous", "-q")
        assert proc.returncode == 0, proc.stderr
        assert "compiled 2 layers" in proc.stdout and "4 Gather(s)" in proc.stdout
        outs.append(out)
    a, b = outs
    assert {"model.onnx", "clusters.json", "report.json", "export.json", "tokenizer.json"} <= {p.name for p in a.iterdir()}
    # deterministic: same inputs and seed give the same bytes
    assert _digest(a / "model.onnx") == _digest(b / "model.onnx")
    assert _digest(a / "clusters.json") == _digest(b / "clusters.json")
    report = json.loads((a / "report.json").read_text())
    assert report["calibration"] == {"windows": 4, "seqlen": 32, "tokens": 128, "source": str(text)}
    assert report["gathers_added"] == 4 and report["layout"] == "contiguous"
    assert report["clusters"][0] == {"R1": 8, "R2": 16, "R3": 16, "R4": 8, "R5": 16}
    assert set(report["timings_s"]) >= {"export", "calibrate", "cluster", "fold", "save", "total"}
    assert report["peak_rss_mb"] > 0
    desc = json.loads(run_cli("inspect", a / "model.onnx", "--json").stdout)
    assert desc["compiled"]["preset"] == "reorder"
    assert desc["layers"][1]["clusters"]["R2"]["k"] == 16 and desc["layers"][1]["clusters"]["R2"]["heads"] == 4
    assert sum(desc["layers"][0]["clusters"]["R5"]["sizes"]) == 256
    table = run_cli("inspect", a / "model.onnx").stdout
    assert "R2 k=16 (4/head)" in table


@pytest.mark.slow
def test_zero_copy_layout_adds_no_gather(exported, tmp_path):
    proc = run_cli("compile", exported("tiny"), "-o", tmp_path / "z", "--calib", "random", "--nsamples", 2,
                   "--seqlen", 16, "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "z" / "report.json").read_text())["gathers_added"] == 0
    assert "random token ids" in proc.stderr


def _not_written(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.slow
def test_calibration_text_shorter_than_a_window(model_with_tokenizer, tmp_path):
    model_dir, _ = model_with_tokenizer
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    # -q: the text is tokenized after the export stage, whose progress line a log would show before the error
    proc = run_cli("compile", model_dir, "-o", tmp_path / "out", "--calib", short, "--seqlen", 64, "-q")
    assert_one_line_error(proc, "shorter than one window")
    _not_written(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("clusters,msg", [("R1=0", "at least 1"), ("R9=4", "not POINT=K"), ("R1=65", "exceeds"),
                                          ("R2=17", "channels per head")])
def test_bad_cluster_counts(exported, tmp_path, clusters, msg):
    proc = run_cli("compile", exported("tiny"), "-o", tmp_path / "out", "--clusters", clusters, "--nsamples", 1,
                   "--seqlen", 8, "--calib", "random")
    assert_one_line_error(proc, msg)
    _not_written(tmp_path)


@pytest.mark.slow
def test_recipe_clusters_stop_at_one_per_channel_on_a_small_model(tmp_path):
    """The default recipe's 64 clusters at the fc2 input of eager W4A4 on a model with 32 FFN channels: one
    per channel, where the same count asked for with --clusters is refused."""
    model = save_random_opt(tmp_path / "hf", seed=0, num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                            ffn_dim=32)
    common = ("--preset", "W4A4", "--nsamples", 1, "--seqlen", 8, "--calib", "random", "-q")
    proc = run_cli("compile", model, "-o", tmp_path / "out", *common)
    assert proc.returncode == 0 and (tmp_path / "out" / "model.onnx").is_file(), proc.stderr
    assert_one_line_error(run_cli("compile", model, "-o", tmp_path / "asked", "--clusters", "R5=64", *common),
                          "R5=64 exceeds")


@pytest.mark.slow
def test_non_opt_onnx(tmp_path):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    path = tmp_path / "mm.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    assert_one_line_error(run_cli("compile", path, "-o", tmp_path / "out", "--calib", "random"), "no attention Softmax")
    _not_written(tmp_path)


@pytest.mark.slow
def test_text_calibration_needs_a_tokenizer(exported, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    # the tiny export's directory has no tokenizer files
    assert_one_line_error(run_cli("compile", exported("tiny"), "-o", tmp_path / "out", "--calib", text), "--calib random")
    _not_written(tmp_path)


@pytest.mark.slow
def test_binary_calibration_text(model_with_tokenizer, tmp_path):
    model_dir, _ = model_with_tokenizer
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert_one_line_error(run_cli("compile", model_dir, "-o", tmp_path / "out", "--calib", binary), "binary")


@pytest.mark.slow
def test_seqlen_beyond_positions(exported, tmp_path):
    proc = run_cli("compile", exported("tiny"), "-o", tmp_path / "out", "--seqlen", 4096, "--calib", "random")
    assert_one_line_error(proc, "positions")


@pytest.mark.slow
def test_external_weights_are_calibrated_from_disk(exported, tmp_path):
    """A model with external data is calibrated without loading its weights, with the same result."""
    import onnx

    from rptq_onnx.compile import compile_model
    from rptq_onnx.config import CalibConfig, CompileConfig

    src = exported("tiny")
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save_model(onnx.load(str(src)), str(ext_dir / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    (ext_dir / "export.json").write_bytes((src.parent / "export.json").read_bytes())
    config = CompileConfig(calib=CalibConfig(nsamples=3, seqlen=16), layout="contiguous")
    a = compile_model(str(src), tmp_path / "a", config, progress=False)
    b = compile_model(str(ext_dir / "model.onnx"), tmp_path / "b", config, progress=False)
    assert (tmp_path / "a" / "clusters.json").read_text() == (tmp_path / "b" / "clusters.json").read_text()
    assert a.report.clusters == b.report.clusters
    assert sorted(p.name for p in ext_dir.iterdir()) == ["export.json", "model.onnx", "model.onnx.data"]


@pytest.mark.slow
def test_kv_only_preset_clusters_only_k_and_v(exported, tmp_path, monkeypatch):
    """W4A4KV with the zero-copy layout clusters R2/R3 only: R1/R4/R5 get identity plans, marked and
    reported as not clustered, with nothing folded for them; the model computes what a compile that
    clusters every point computes (RTN per output channel does not see fc1/fc2's channel order)."""
    from rptq_onnx import compile as compile_module
    from rptq_onnx import planning
    from rptq_onnx.artifacts import load_cluster_plans
    from rptq_onnx.compile import compile_model
    from rptq_onnx.runtime import feeds_for
    from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
    from rptq_onnx.runtime import make_session

    def config(layout="zero-copy"):
        return CompileConfig(preset="W4A4KV", layout=layout, quant=QuantSpec.for_preset("W4A4KV", weight_quant="rtn"),
                             clusters=ClusterCounts(R1=8, R4=8, R5=8), calib=CalibConfig(nsamples=4, seqlen=32))

    src = str(exported("tiny"))
    kv = compile_model(src, tmp_path / "kv", config(), progress=False)
    assert all(c["R1"] is None and c["R4"] is None and c["R5"] is None and c["R2"] and c["R3"]
               for c in kv.report.clusters)
    assert kv.report.cluster_sizes[0]["R5"] is None
    plans = load_cluster_plans(tmp_path / "kv")
    assert not plans[0]["R5"].clustered and plans[0]["R2"].clustered
    np.testing.assert_array_equal(plans[0]["R5"].index, np.arange(plans[0]["R5"].channels))
    assert "R1 not clustered" in run_cli("inspect", tmp_path / "kv").stdout
    proc = run_cli("inspect", tmp_path / "kv", "--ranges", tmp_path / "r5.png", "--point", "R5", "--layer", 0)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r5.json").read_text())["layers"][0]["clustered"] is False

    contiguous = compile_model(src, tmp_path / "contiguous", config("contiguous"), progress=False)
    assert all(contiguous.report.clusters[0].values())  # the layout reorders R1/R4: every point clustered

    for module in (planning, compile_module):  # the plans, and the report's list of choices
        monkeypatch.setattr(module, "unclustered_points", lambda config: frozenset())
    full = compile_model(src, tmp_path / "full", config(), progress=False)
    assert full.report.clusters[0]["R5"] == 8
    assert kv.report.permuted_initializers < full.report.permuted_initializers
    ids = np.random.default_rng(0).integers(0, 512, (2, 16))
    logits = []
    for out in (kv, full):
        sess = make_session(str(out.model_path))
        logits.append(sess.run(["logits"], feeds_for(sess, ids))[0])
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4 * np.abs(logits[1]).max())
