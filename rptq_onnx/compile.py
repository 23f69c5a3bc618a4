"""`rptq-onnx compile`: export (if needed) → calibrate → cluster → fold reorders → write.

Stages are timed and reported in ``report.json``; the cluster plan goes to ``clusters.json``
and the configuration into the model's ``metadata_props`` (key ``rptq.config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from rptq_onnx import __version__
from rptq_onnx.anatomy import DecoderLayer, find_layers
from rptq_onnx.artifacts import CLUSTERS_NAME, OWNED_FILES, RANGES_NAME, RECORD_NAME, REPORT_NAME, TOKENIZER_FILES, model_limits
from rptq_onnx.calibrate import Calibration, calibrate, calibration_windows
from rptq_onnx.clustering import ClusterPlan
from rptq_onnx.compile_report import CalibrationSummary, CompileReport, QuantizationReport, RecipeChoices
from rptq_onnx.config import CompileConfig
from rptq_onnx.errors import RptqError
from rptq_onnx.genai import write_genai_config
from rptq_onnx.external_weights import WeightSink
from rptq_onnx.graph import EXTERNAL_DATA_SUFFIX, EXTERNAL_DATA_THRESHOLD, load_model, save_model, staged_output, weights_loaded
from rptq_onnx.onnx_source import resolve_onnx_source
from rptq_onnx import quantize
from rptq_onnx.outdir import check_writable, claim_output, input_bytes, work_dir
from rptq_onnx.passes.base import copy_model
from rptq_onnx.passes.fold_reorder import FoldReorder, FoldReport
from rptq_onnx.passes.fuse_attention import FuseAttention
from rptq_onnx.passes.fuse_norms import FuseNorms
from rptq_onnx.passes.pack_qkv import PackQKV
from rptq_onnx.passes.quantize_head import QuantizeHead
from rptq_onnx.planning import amplitude_key, check_cluster_counts, plan_layer, unclustered_points
from rptq_onnx.ranges import save_ranges
from rptq_onnx.recipes import point_choices, resolve_clusters
from rptq_onnx.stages import StageRunner
from rptq_onnx.text import has_tokenizer, read_text
from rptq_onnx.vocabulary import CLUSTERS_KEY, CONFIG_KEY, RPTQ_PREFIX, VERSION_KEY



@dataclass(frozen=True)
class CompileResult:
    model_path: Path
    report: CompileReport


def check_calibration_text(model: str, source: str) -> None:
    """Before any export: the --calib text is readable and the model folder has a tokenizer for it."""
    if source == "random":
        return
    read_text(source)
    path = Path(model)
    folder = path.parent if path.suffix == ".onnx" else path if path.is_dir() else None
    if folder is not None and folder.is_dir() and not has_tokenizer(folder):
        raise RptqError(f"{folder}: no tokenizer files beside the model (tokenizer.json, vocab.json or "
                        "tokenizer_config.json), so --calib text cannot be tokenized; add them, or use --calib random")


@dataclass
class Compiled:
    model: onnx.ModelProto
    plans: list[dict[str, ClusterPlan]]
    fold: FoldReport
    quant: QuantizationReport
    calibration: Calibration
    config: CompileConfig  # as compiled: ``attention="auto"`` resolved


def fused_head_dim_ok(layers: list[DecoderLayer]) -> bool:
    return all(layer.head_dim % 8 == 0 for layer in layers)


def resolve_attention(config: CompileConfig, layers: list[DecoderLayer]) -> CompileConfig:
    """``attention="auto"``: fused for the KV presets (a low-bit cache) on a graph with a cache — the
    same or better perplexity and faster decoding (README, *Fused attention*) — else eager."""
    if config.attention != "auto":
        return config
    q = config.quant
    cached = all(layer.past_key and layer.present_key for layer in layers)
    fused = cached and fused_head_dim_ok(layers) and q.kv_only and q.quantizes_activations and not q.float_cache
    return dataclasses.replace(config, attention="fused" if fused else "eager")


def _check_uncompiled(graph: onnx.ModelProto, model_path: Path | None) -> None:
    """Compiling a compiled graph would permute already-permuted (or already-quantized) weights."""
    if any(p.key == CONFIG_KEY for p in graph.metadata_props) or \
            any(n.name.startswith(RPTQ_PREFIX) for n in graph.graph.node):
        where = model_path or "the model"
        raise RptqError(f"{where} was already compiled by rptq-onnx; compile the exported model it came from "
                        "(or the checkpoint) instead")


def _check_fused(config: CompileConfig, layers: list[DecoderLayer]) -> None:
    if config.attention == "fused" and not all(layer.past_key and layer.present_key for layer in layers):
        raise RptqError("--attention fused needs a graph with a KV cache (GroupQueryAttention keeps it); export with "
                        "--with-past, or use --attention eager")
    if config.attention == "fused" and not fused_head_dim_ok(layers):
        raise RptqError(f"--attention fused: head_dim {layers[0].head_dim} is not a multiple of 8, which ONNX Runtime's "
                        "GroupQueryAttention needs; use --attention eager")


def _own_copy(graph: onnx.ModelProto, model_path: Path | None) -> onnx.ModelProto:
    """The graph with its weights, as compile's own copy: every pass after calibration edits it in place."""
    return copy_model(graph) if weights_loaded(graph) else load_model(model_path)


def prepare(graph: onnx.ModelProto, layers: list[DecoderLayer], config: CompileConfig,
            model_path: Path | None) -> tuple[CompileConfig, bool]:
    """Checks before compiling, and the config as compiled (attention, clusters and source grid resolved); returns it
    and whether calibration gathers GPTQ's Hessians."""
    _check_uncompiled(graph, model_path)
    config = resolve_clusters(resolve_attention(config, layers))
    _check_fused(config, layers)
    config, on_grid = quantize.resolve_source_grid(config, graph, layers, str(model_path.parent) if model_path else "")
    q = config.quant
    # GPTQ needs Hessians unless every weight keeps its source grid (judged on the first layer)
    hessians = q.quantizes_weights and q.weight_quant == "gptq" and not (on_grid and all(on_grid.values()))
    return config, hessians


def _has_samples(calib: Calibration) -> bool:
    return any(stats.sample is not None for stats in calib.stats.values())


def compile_graph(graph: onnx.ModelProto, layers: list[DecoderLayer], windows, config: CompileConfig,
                  runner: StageRunner | None = None, progress: bool = False, model_path: Path | None = None,
                  calibration: Calibration | None = None, positions: int | None = None) -> Compiled:
    """Calibrate on ``windows``, cluster, fold the reorders, quantize; ``graph`` is not modified.

    ``graph`` may be a skeleton without its external weights (from ``model_path``): it is
    calibrated as is, and the weights are loaded only for folding. ``calibration``: statistics
    of the same graph and windows from an earlier run (benchmarks compiling many variants),
    used instead of calibrating again (with Hessians when GPTQ needs them). ``positions``: the model's
    maximum positions, for the rotary caches of fused attention (None: RoPE stays in the graph).
    """
    config, hessians = prepare(graph, layers, config, model_path)
    q = config.quant
    runner = runner or StageRunner()
    with runner.stage("calibrate"):
        calib = calibration
        samples, first = quantize.sampled_taps(config), quantize.first_token_taps(config)
        head = quantize.gptq_head_input(graph, config)
        if (calib is None or (hessians and not calib.xtx) or (samples and not _has_samples(calib))
                or calib.skipped_first != first or (head and calib.head_xtx is None)):
            calib = calibrate(graph, layers, windows, batch_size=config.calib.batch_size, progress=progress,
                              model_dir=model_path.parent if model_path else None, hessians=hessians,
                              sample_taps=samples, skip_first=first, head_input=head)
    with runner.stage("cluster"):
        plans = [plan_layer(layer, calib.stats, config)
                 for layer in tqdm(layers, desc="clustering", unit="layer", disable=not progress or None, leave=False)]
    clustered = [{p: plan for p, plan in lp.items() if plan.clustered} for lp in plans]  # identities: nothing to fold
    with runner.stage("fold"):
        model = _own_copy(graph, model_path)
        fold = runner.apply("fold", FoldReorder(layers, clustered, config.layout, quantize.keeps_source_grid(config)),
                            model).report
    quant = QuantizationReport(name=config.name)
    if q.quantizes_weights or q.quantizes_activations:
        with runner.stage("quantize"):
            model, quant = quantize.quantize_graph(model, layers, find_layers(model), plans, calib, config, progress,
                                                   owned=True)
    if config.attention == "fused":
        quant.attention = runner.run("fuse", FuseAttention(cache_bits=config.fused_cache_bits, rotary_positions=positions),
                                     model).report
        quant.attention.qkv_packed = runner.run("pack_qkv", PackQKV(), model).report.layers
        quant.attention.norms_fused = runner.run("fuse_norms", FuseNorms(), model).report.fused
    if q.head_bits < 16:
        quant.head = runner.run("head", QuantizeHead(q.head_bits, accuracy_level=q.accuracy_level,
                                                     hessian=calib.head_hessian() if head else None), model).report
    return Compiled(model=model, plans=plans, fold=fold, quant=quant, calibration=calib, config=config)


def compile_model(model: str, out_dir: str | os.PathLike, config: CompileConfig, with_past: bool = True,
                  progress: bool = True, write_report: bool = False,
                  calibration: Calibration | None = None, log: Callable[[str], None] | None = None,
                  layer_wise: bool | None = None) -> CompileResult:
    """Compile ``model`` into ``out_dir`` (written atomically); ``write_report``: also report.md + PNGs.

    ``calibration``: see ``compile_graph`` (it must come from the same model and ``config.calib``).
    ``log(stage)``: called as each stage (export, load, calibrate, cluster, fold, quantize, save) starts.
    ``layer_wise``: one decoder layer in memory at a time (rptq_onnx/compile_layerwise.py; the same
    output as the whole graph with float propagation); None (default): layer-wise where the graph can be
    cut into layers and no ``calibration`` is reused, else whole-graph. ``config.propagate ==
    "quantized"`` needs it."""
    if config.propagate == "quantized" and layer_wise is False:
        raise RptqError("--propagate quantized calibrates layer by layer; drop --whole-graph")
    if (layer_wise or config.propagate == "quantized") and calibration is not None:
        raise ValueError("a layer-wise compile calibrates as it goes; it cannot reuse a calibration")
    runner = StageRunner(log)
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    with claim_output(out_dir, model), work_dir("compile") as tmp:
        # a lower bound for the output: the input's weights at the new width (weights are fp32 in an export)
        check_writable(out_dir, input_bytes(model) * config.quant.wbits // 32)
        check_calibration_text(model, config.calib.source)
        onnx_path = resolve_onnx_source(model, tmp, with_past, runner)
        with runner.stage("load"):
            graph = load_model(onnx_path, load_weights=False)  # external weights stay on disk
            layers = find_layers(graph)
            check_cluster_counts(config, layers)
            vocab, max_pos = model_limits(onnx_path, graph)
            windows = calibration_windows(config.calib, onnx_path.parent, vocab, max_pos)
            if layer_wise is None:
                layer_wise = config.propagate == "quantized" or (calibration is None and cuttable(graph, layers))
        sink = WeightSink(tmp, "model.onnx" + EXTERNAL_DATA_SUFFIX) if layer_wise else None
        if sink is not None:
            from rptq_onnx.compile_layerwise import compile_layerwise

            config, hessians = prepare(graph, layers, config, onnx_path)
            compiled = Compiled(*compile_layerwise(graph, layers, windows, config, hessians, onnx_path, sink,
                                                   runner=runner, progress=progress, positions=max_pos), config=config)
        else:
            compiled = compile_graph(graph, layers, windows, config, runner=runner, progress=progress,
                                     model_path=onnx_path, calibration=calibration, positions=max_pos)
        del graph
        folded, plans, config = compiled.model, compiled.plans, compiled.config
        _stamp(folded, config)
        report = _report(model, compiled, windows, layers)
        report.mode = "layer-wise" if sink is not None else "whole-graph"
        clusters = {"format": "rptq-onnx clusters", "version": 1, "layout": config.layout,
                    "layers": [{p: plan.to_dict() for p, plan in lp.items()} for lp in plans]}
        with staged_output(out_dir, owns=OWNED_FILES) as stage:
            with runner.stage("save"):
                if sink is None:
                    save_model(folded, stage / "model.onnx")
                else:  # the layers' tensors are in the sink's file already
                    sink.finish(folded, onnx_path.parent)
                    if sink.path.stat().st_size <= EXTERNAL_DATA_THRESHOLD:  # small: one file, as save_model writes
                        sink.load_all(folded)
                        save_model(folded, stage / "model.onnx")
                    else:
                        onnx.save_model(folded, str(stage / "model.onnx"))
                        shutil.move(sink.path, stage / sink.name)
                for name in (*TOKENIZER_FILES, RECORD_NAME):
                    if (onnx_path.parent / name).is_file():
                        shutil.copy2(onnx_path.parent / name, stage / name)
                (stage / CLUSTERS_NAME).write_text(json.dumps(clusters) + "\n")
                write_genai_config(folded, stage)  # where onnxruntime-genai can hold the cache (rptq_onnx.genai)
                save_ranges(stage / RANGES_NAME, compiled.calibration.stats, len(layers))
            report.timings_s = {**runner.timings, "total": round(time.perf_counter() - t_start, 3)}
            report.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            (stage / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
            if write_report:
                from rptq_onnx.report import write_report as write_markdown

                write_markdown(stage, report, windows[:2])
    return CompileResult(model_path=out_dir / "model.onnx", report=report)


def cuttable(graph: onnx.ModelProto, layers: list[DecoderLayer]) -> bool:
    """Can ``graph`` be compiled layer by layer (``layerwise.find_cut``)?"""
    from rptq_onnx.layerwise import find_cut

    try:
        find_cut(graph, layers)
    except RptqError:
        return False
    return True


def _report(source: str, compiled: Compiled, windows: np.ndarray, layers: list[DecoderLayer]) -> CompileReport:
    """``report.json`` but for the timings and peak RSS, known only after saving."""
    config, plans, fold = compiled.config, compiled.plans, compiled.fold
    return CompileReport(
        rptq_onnx=__version__, source=str(source), config=config, layers=len(plans),
        calibration=CalibrationSummary(windows=int(windows.shape[0]), seqlen=int(windows.shape[1]),
                                       tokens=int(windows.size), source=config.calib.source),
        # None: a point not clustered (unclustered_points)
        clusters=[{p: plan.num_clusters if plan.clustered else None for p, plan in lp.items()} for lp in plans],
        cluster_sizes=[{p: [min(plan.cluster_sizes()), max(plan.cluster_sizes())] if plan.clustered else None
                        for p, plan in lp.items()} for lp in plans],
        layout=fold.layout, gathers_added=fold.gathers, permuted_initializers=fold.permuted_initializers,
        copied_shared_initializers=sorted(set(fold.copied_shared)), quantization=compiled.quant,
        recipe=RecipeChoices(name=config.recipe, choices=point_choices(
            config, rope=layers[0].q_rope is not None, amplitude_key=amplitude_key(layers[0], config),
            skipped=unclustered_points(config), keeps_grid=quantize.keeps_source_grid(config))))


def _stamp(model: onnx.ModelProto, config: CompileConfig) -> None:
    entries = {p.key: p for p in model.metadata_props}
    for key, value in ((CONFIG_KEY, config.to_json()), (VERSION_KEY, __version__), (CLUSTERS_KEY, CLUSTERS_NAME)):
        if key in entries:
            entries[key].value = value
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value

