"""Recipes: `--recipe paper` fixes the reference's choices and refuses a flag it overrides; default passes flags through."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rptq_onnx.config import ClusterCounts, CompileConfig, QuantSpec
from rptq_onnx.errors import RptqError
from rptq_onnx.recipes import point_choices, recipe_flags
from test_cli import assert_one_line_error, run_cli

NONE = dict.fromkeys(("observer", "clusters", "weight_quant", "group_size", "source_grid", "head_bits", "attention"))


def test_default_recipe_keeps_what_was_given_and_fills_the_rest():
    flags = recipe_flags("default", {**NONE, "observer": "minmax", "group_size": 32})
    assert flags["observer"] == "minmax" and flags["group_size"] == 32
    assert flags["source_grid"] == "keep" and flags["attention"] == "auto" and flags["weight_quant"] == "gptq"
    assert flags["softmax_scale"] == "row" and flags["first_token"] == "float"


def test_paper_recipe_fixes_the_reference_choices():
    flags = recipe_flags("paper", NONE)
    assert flags == {"observer": "ema", "clusters": None, "weight_quant": "gptq", "group_size": 0,
                     "source_grid": "requantize", "head_bits": 16, "attention": "eager", "propagate": "quantized",
                     "softmax_scale": "fixed", "first_token": "quantized"}
    # the same value as the recipe's is no conflict
    assert recipe_flags("paper", {**NONE, "observer": "ema", "clusters": "R2=4"}) == flags


@pytest.mark.parametrize("flag,value,fragment", [("observer", "minmax", "--observer ema"),
                                                  ("clusters", "R1=8", "--clusters R1=32"),
                                                  ("attention", "fused", "--attention eager"),
                                                  ("source_grid", "keep", "--source-grid requantize"),
                                                  ("propagate", "float", "--propagate quantized"),
                                                  ("softmax_scale", "row", "--softmax-scale fixed"),
                                                  ("first_token", "float", "--first-token quantized")])
def test_paper_recipe_refuses_a_flag_it_overrides(flag, value, fragment):
    with pytest.raises(RptqError, match=fragment):
        recipe_flags("paper", {**NONE, flag: value})


def test_unknown_recipe_is_refused():
    with pytest.raises(RptqError, match="--recipe best is unknown"):
        recipe_flags("best", NONE)
    with pytest.raises(RptqError, match="--recipe"):
        CompileConfig(recipe="best")


def test_cli_refuses_a_recipe_flag_combined_with_one_it_overrides(tmp_path):
    proc = run_cli("compile", "-o", tmp_path / "out", "--recipe", "paper", "--observer", "minmax", "--calib", "random")
    assert_one_line_error(proc, "--recipe paper fixes --observer ema")
    assert not (tmp_path / "out").exists()


def test_point_choices_say_what_each_point_got():
    config = CompileConfig(preset="W4A4KV", quant=QuantSpec.for_preset("W4A4KV"), clusters=ClusterCounts(R3="ch"))
    choices = point_choices(config, rope=True, amplitude_key=True, skipped=frozenset({"R1", "R4", "R5"}), keeps_grid=True)
    assert choices["R1"].startswith("not clustered")
    assert "amplitude" in choices["R2"] and "one cluster per channel" in choices["R3"]
    assert "source grid kept" in choices["weights"] and "P" not in choices  # KV-only: no softmax point
    assert "first token" not in choices  # KV-only: nothing on the residual side is quantized
    paper = CompileConfig(recipe="paper", preset="W4A4", quant=QuantSpec.for_preset("W4A4", group_size=0,
                                                                                    softmax_scale="fixed",
                                                                                    first_token="quantized"))
    choices = point_choices(paper, rope=True, amplitude_key=False, skipped=frozenset(), keeps_grid=False)
    assert "RoPE pairs" in choices["R2"] and choices["P"].endswith("1/255")
    assert choices["weights"] == "GPTQ per output channel" and choices["first token"].startswith("quantized")


def test_auto_observer_takes_min_max_at_8_bit_points_and_the_mean_below():
    config = CompileConfig(preset="W4A4", quant=QuantSpec.for_preset("W4A4", observer="auto"))
    choices = point_choices(config, rope=False, amplitude_key=False, skipped=frozenset(), keeps_grid=False)
    # the norm outputs are quantized to max(8, abits) bits, the rest to 4
    assert choices["R1"].endswith(", min/max widened 1.5×") and choices["R4"].endswith(", min/max widened 1.5×")
    assert all(choices[p].endswith("mean of per-window min/max") for p in ("R2", "R3", "R5"))
    mse = CompileConfig(preset="W4A4", quant=QuantSpec.for_preset("W4A4", observer="mse"))
    choices = point_choices(mse, rope=False, amplitude_key=False, skipped=frozenset(), keeps_grid=False)
    assert all(c.endswith("clipping searched (least squared error on sampled calibration tokens)")
               for p, c in choices.items() if p.startswith("R"))
    a8 = CompileConfig(preset="W8A8", quant=QuantSpec.for_preset("W8A8", observer="auto"))
    choices = point_choices(a8, rope=False, amplitude_key=False, skipped=frozenset(), keeps_grid=False)
    assert all(choices[p].endswith(", min/max widened 1.5×") for p in ("R1", "R2", "R3", "R4", "R5"))
    kv = CompileConfig(preset="W4A4KV", quant=QuantSpec.for_preset("W4A4KV", observer="auto"))
    choices = point_choices(kv, rope=False, amplitude_key=False, skipped=frozenset(), keeps_grid=False)
    assert choices["R2"].endswith("EMA min/max") and choices["R3"].endswith("EMA min/max")  # the KV presets' K/V


def test_default_recipe_picks_fused_kv_clusters_only_where_none_were_given():
    from rptq_onnx.recipes import FUSED_KV_CLUSTERS, resolve_clusters

    kv4 = QuantSpec.for_preset("W4A4KV")
    base = CompileConfig(preset="W4A4KV", quant=kv4, attention="fused", recipe_clusters=True)
    chosen = resolve_clusters(base).clusters
    assert {p: getattr(chosen, p) for p in FUSED_KV_CLUSTERS[4]} == FUSED_KV_CLUSTERS[4]
    assert chosen.R1 == ClusterCounts().R1
    # given counts and the paper recipe keep theirs
    for config in (dataclasses.replace(base, recipe_clusters=False), dataclasses.replace(base, recipe="paper")):
        assert resolve_clusters(config).clusters == ClusterCounts()
    assert CompileConfig.from_json(base.to_json()) == base
    a8 = CompileConfig(preset="W4A8", quant=QuantSpec.for_preset("W4A8"), attention="eager", recipe_clusters=True)
    chosen = resolve_clusters(a8).clusters  # eager 8-bit: one cluster per channel at q/K/V and the out_proj input
    assert (chosen.R2, chosen.R3, chosen.R5) == ("ch", "ch", ClusterCounts().R5)
    assert resolve_clusters(dataclasses.replace(a8, recipe="paper")).clusters == ClusterCounts()
    a4 = CompileConfig(preset="W4A4", quant=QuantSpec.for_preset("W4A4"), attention="eager", recipe_clusters=True)
    chosen = resolve_clusters(a4).clusters  # eager 4-bit: more clusters at q/K and the down_proj input
    assert (chosen.R1, chosen.R2, chosen.R3, chosen.R4, chosen.R5) == (32, 8, 4, 32, 64)
    assert resolve_clusters(dataclasses.replace(a4, recipe_clusters=False)).clusters == ClusterCounts()


def test_cli_reports_the_clusters_the_recipe_chose(tmp_path, text_llama):
    out = run_cli("compile", text_llama, "-o", tmp_path / "kv", "--preset", "W4A4KV", "--wbits", "16",
                  "--calib", "random", "--nsamples", "2", "--seqlen", "16", "-q")
    assert out.returncode == 0, out.stderr
    assert "R2=8,R3=2" in out.stdout and "attention fused" in out.stdout
    report = json.loads((tmp_path / "kv" / "report.json").read_text())
    assert report["config"]["clusters"]["R2"] == 8 and "8 clusters per K/V head" in report["recipe"]["choices"]["R2"]


@pytest.mark.parametrize("recipe,default", [("default", True), ("paper", False)])
def test_softmax_scale_and_first_token_follow_the_recipe(tmp_path, text_llama, recipe, default):
    """default: P per row and each sequence's first token in float; paper: P at 1/255, every token quantized."""
    import onnx

    out = run_cli("compile", text_llama, "-o", tmp_path / "a4", "--preset", "W4A4", "--wbits", "16", "--recipe", recipe,
                  "--calib", "random", "--nsamples", "2", "--seqlen", "16", "-q")
    assert out.returncode == 0, out.stderr
    graph = onnx.load(str(tmp_path / "a4" / "model.onnx"), load_external_data=False).graph
    layers = json.loads((tmp_path / "a4" / "config.json").read_text())["num_hidden_layers"]
    choices = json.loads((tmp_path / "a4" / "report.json").read_text())["recipe"]["choices"]
    p_rescales = [n for n in graph.node if n.name.startswith("rptq.layout.") and n.name.endswith(".P.rescale")]
    assert len(p_rescales) == (layers if default else 0)
    assert ("row's maximum" in choices["P"]) == default and choices["P"].endswith("normalized after)" if default else "1/255")
    kept = sorted(n.name.split(".")[3] for n in graph.node if n.name.startswith("rptq.layout.L") and n.name.endswith(".first.out"))
    assert kept == (sorted(["attn_ln", "ffn_ln", "fc2_in", "out_in"] * layers) if default else [])
    assert choices["first token"].startswith("kept in float" if default else "quantized")
