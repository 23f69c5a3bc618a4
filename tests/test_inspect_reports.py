"""`inspect --ranges` and `inspect --error` on a compiled random OPT with injected outlier channels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rptq_onnx.compile import compile_model
from rptq_onnx.config import CalibConfig, ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.export import export
from rptq_onnx.models import random_opt_with_outliers
from rptq_onnx.point_error import point_errors
from rptq_onnx.ranges import plot_ranges
from test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # every test here exports or compiles a model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def outlier_models(tmp_path_factory):
    """{"k32": dir, "k1": dir, "fp": dir} of a 2-layer OPT with ×30 LayerNorm outlier channels."""
    root = tmp_path_factory.mktemp("outliers")
    random_opt_with_outliers().save_pretrained(root / "hf")
    fp = export(str(root / "hf"), root / "fp", with_past=False).model_path.parent
    out = {"fp": fp}
    for name, clusters in (("k32", ClusterCounts()), ("k1", ClusterCounts.parse("all=1"))):
        # plain min/max ranges: the comparison is about cluster granularity, not the EMA's clipping
        cfg = CompileConfig(preset="W4A4", clusters=clusters, calib=CalibConfig(nsamples=8, seqlen=48),
                            quant=QuantSpec.for_preset("W4A4", weight_quant="rtn", observer="minmax"))
        out[name] = compile_model(str(fp / "model.onnx"), root / name, cfg, progress=False).model_path.parent
    return out


def test_ranges_png_shows_the_clusters(outlier_models, tmp_path):
    png = tmp_path / "r1.png"
    plot_ranges(outlier_models["k32"], png, point="R1", layer=0)
    raw = png.read_bytes()
    assert raw[:8] == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[0] > 100
    data = json.loads(png.with_suffix(".json").read_text())["layers"][0]
    assert len(data["clusters"]) == 32 and len(set(data["cluster"])) == 32 and len(data["max"]) == 256
    assert data["spread"] > 10  # the injected outliers are visible in the data
    # the grid over all layers, and same inputs → same bytes
    plot_ranges(outlier_models["k32"], tmp_path / "grid.png", point="R4")
    plot_ranges(outlier_models["k32"], tmp_path / "grid2.png", point="R4")
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "grid2.png").read_bytes()
    assert len(json.loads((tmp_path / "grid.json").read_text())["layers"]) == 2


def test_sqnr_table_and_clusters_beat_per_tensor_at_r1(outlier_models):
    windows = np.random.default_rng(1).integers(0, 300, (4, 48))
    k32, k1 = point_errors(outlier_models["k32"], windows), point_errors(outlier_models["k1"], windows)
    points = ("attn_ln", "q", "k", "v", "out_in", "ffn_ln", "fc2_in", "P")
    assert [(r["layer"], r["point"]) for r in k32["rows"]] == [(i, p) for i in range(2) for p in points]
    for layer in range(2):
        r1 = [next(r for r in rep["rows"] if r["layer"] == layer and r["point"] == "attn_ln") for rep in (k32, k1)]
        assert r1[0]["local_sqnr_db"] > r1[1]["local_sqnr_db"] + 1, r1
    assert k32["logits"]["kl_per_token"] < k1["logits"]["kl_per_token"]
    assert 0 <= k32["logits"]["top1_agreement"] <= 1


def test_cli_error_table_and_plot(outlier_models, tmp_path):
    proc = run_cli("inspect", outlier_models["k32"], "--error", "--calib", "random", "--nsamples", "2", "--seqlen", "32",
                   "--plot", tmp_path / "sqnr.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| 0 |") == 8 and "top-1 agreement" in proc.stdout
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_bad_input(outlier_models, tmp_path):
    k32 = outlier_models["k32"]
    assert_one_line_error(run_cli("inspect", k32, "--ranges", tmp_path / "a.png", "--layer", "7"), "--layer 7", "0..1")
    assert_one_line_error(run_cli("inspect", k32, "--ranges", tmp_path / "a.png", "--point", "R7"), "--point R7")
    assert_one_line_error(run_cli("inspect", outlier_models["fp"], "--error", "--calib", "random"), "not compiled")
    assert_one_line_error(run_cli("inspect", outlier_models["fp"], "--ranges", tmp_path / "a.png"), "compile")
    assert not (tmp_path / "a.png").exists()


def test_compile_report_bundle(outlier_models, tmp_path):
    cfg = CompileConfig(preset="W4A4KV", calib=CalibConfig(nsamples=4, seqlen=32),
                        quant=QuantSpec.for_preset("W4A4KV", weight_quant="rtn"))
    out = compile_model(str(outlier_models["fp"] / "model.onnx"), tmp_path / "rep", cfg, progress=False,
                        write_report=True).model_path.parent
    text = (out / "report.md").read_text()
    for section in ("## Cluster plan", "## Channel ranges", "## Per-point error", "## Memory"):
        assert section in text
    assert "| 1 | R3 v (V cache) |" in text  # one SQNR row per layer × quantized point
    for png in ("ranges-R1.png", "ranges-R4.png", "sqnr.png"):
        assert (out / "report" / png).read_bytes()[:8] == PNG_MAGIC


def test_inspect_labels_what_was_compiled(compiled_text_opt, text_opt, tmp_path):
    """The effective configuration, not the preset's: --wbits overrides, 3-bit codes in 4-bit storage,
    per-tensor points as one scale in every section."""
    from rptq_onnx.inspection import describe, format_table

    table = format_table(describe(compiled_text_opt("W4A4KV", wbits=16)))
    assert "W4A4KV = W16A4KV" in table
    w3 = describe(compiled_text_opt("W3A3KV"))
    verdicts = [v for layer in w3["quantization"] for v in layer["linears"].values()]
    assert {(v["weight_bits"], v["storage_bits"]) for v in verdicts} == {(3, 4)}
    assert "w3 (in 4-bit storage)" in format_table(w3)
    config = CompileConfig(preset="W4A4", clusters=ClusterCounts.parse("all=tensor"),
                           quant=QuantSpec.for_preset("W4A4", weight_quant="rtn"),
                           calib=CalibConfig(source="random", nsamples=2, seqlen=32))
    out = compile_model(str(text_opt), tmp_path / "tensor", config, progress=False).model_path.parent
    table = format_table(describe(out))
    assert "R2 k=1 (one scale per tensor)" in table and "k=2" not in table


def test_point_cost_tool_leaves_one_kind_of_point_in_float_at_a_time(compiled_text_opt, capsys):
    from rptq_onnx.tools.bench_point_cost import main

    folder = compiled_text_opt("W4A4")
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    assert main([str(folder), "--max-tokens", "512", "--seqlen", "64", "--groups", "fc2_in,q+k+v,nothing"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    base = float(rows["(as compiled)"].split(" | ")[1])
    for group in ("fc2_in", "q+k+v"):  # a float point changes the model's perplexity
        assert float(rows[group].split(" | ")[1]) != base
    assert "no such point" in rows["nothing"]
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before  # the compiled model is untouched
