"""`compile --layer-wise`: one decoder layer at a time, so memory holds one layer, not the model.

For each layer in order: calibrate it on the stream entering it (rptq_onnx/layerwise.py: only its
weights in ONNX Runtime, its XᵀX sums only), cluster it, load its weights, fold its reorders,
quantize it (weights, activation Q/DQ, KV cache), then write its tensors to the output's data file
(``WeightSink``) and drop them. The next layer sees the float stream leaving this layer
(``propagate="float"``: the same clusters and codes as the whole-graph compile) or the stream of the
quantized layer (``"quantized"``, as the reference calibrates: later layers adapt to the error of
earlier ones). Fused attention and the 4/8-bit head run last, reading back only what they need.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from rptq_onnx import quantize
from rptq_onnx.anatomy import DecoderLayer, find_layers
from rptq_onnx.calibrate import LayerwiseCalibration
from rptq_onnx.compile_report import QuantizationReport
from rptq_onnx.config import CompileConfig
from rptq_onnx.external_weights import WeightSink, is_external, load_initializers
from rptq_onnx.passes.base import copy_model
from rptq_onnx.passes.fold_reorder import FoldReorder, FoldReport
from rptq_onnx.passes.fuse_attention import FuseAttention
from rptq_onnx.passes.fuse_norms import FuseNorms
from rptq_onnx.passes.pack_qkv import PackQKV, initializers_read
from rptq_onnx.passes.quantize_head import QuantizeHead
from rptq_onnx.planning import plan_layer
from rptq_onnx.stages import StageRunner

# report fields summed over layers, and those whose values are united
_SUMMED = {"gathers", "permuted_initializers", "dq", "matmulnbits", "kept_source_grid", "points", "tensors", "layers",
           "offsets_folded", "bias_adds", "kv_qdq_dropped", "rotary_in_kernel"}
_UNITED = {"group_sizes_used", "bits", "containers"}


def compile_layerwise(graph: onnx.ModelProto, layers: list[DecoderLayer], windows: np.ndarray, config: CompileConfig,
                      hessians: bool, model_path: Path, sink: WeightSink, runner: StageRunner | None = None,
                      progress: bool = False, positions: int | None = None) -> tuple:
    """``compile_graph``'s result as (model, plans, fold report, quantization report, calibration), made one
    layer at a time from the skeleton ``graph`` (external weights in ``model_path``'s folder, never all
    loaded). ``config`` as ``compile.prepare`` resolved it; ``hessians``: gather GPTQ's. Layer tensors go
    to ``sink`` as they are finished; the returned model references them there (``sink.finish`` writes
    the rest). ``positions``: as for ``compile_graph``."""
    runner = runner or StageRunner()
    source = model_path.parent
    q = config.quant
    model = copy_model(graph)  # a skeleton: small tensors only
    resident = {t.name for t in model.graph.initializer if not is_external(t)}
    with runner.stage("prologue"):
        head = quantize.gptq_head_input(graph, config)
        run = LayerwiseCalibration(graph, layers, windows, config.calib.batch_size, source, hessians,
                                   quantize.sampled_taps(config), quantize.first_token_taps(config), head)
    calib = run.result
    plans, fold, quant = [], FoldReport(layout=config.layout), QuantizationReport(name=config.name)
    spent: dict[str, float] = {}

    @contextmanager
    def timed(phase: str):
        t0 = time.perf_counter()
        yield
        spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t0

    with runner.stage("layers"):
        t0 = time.perf_counter()
        for layer in tqdm(layers, desc="layers", unit="layer", disable=not progress or None):
            i = layer.index
            if runner.log and not progress:  # a log, not a terminal: one line per layer, with an estimate
                left = (time.perf_counter() - t0) / i * (len(layers) - i) if i else None
                runner.log(f"layer {i + 1}/{len(layers)}" + (f", about {left:.0f} s left" if left else ""))
            with timed("calibrate"):
                stream = run.layer(i, keep_input=config.propagate == "quantized")  # quantized: the input runs again
            with timed("cluster"):
                plans.append(plan_layer(layer, calib.stats, config))
            clustered = {p: plan for p, plan in plans[-1].items() if plan.clustered}
            with timed("fold"):
                presents = [t for t in (layer.present_key, layer.present_value) if t]
                load_initializers(model, run.stream.layer_initializers(model, i, presents), source)
                part = FoldReorder([layer], [clustered], config.layout, quantize.keeps_source_grid(config))
                fold = merged(fold, part.run(model, owned=True).report)
            if q.quantizes_weights or q.quantizes_activations:
                with timed("quantize"):
                    folded = find_layers(model)[i]
                    model, done = quantize.quantize_graph(model, [layer], [folded], [plans[-1]], calib, config,
                                                          owned=True, spend_hessians=True)
                    quant = merged(quant, done)
            if config.propagate == "quantized" and i < len(layers) - 1:
                with timed("propagate"):
                    stream = _quantized_stream(run, model, sink, i)
            for key in [k for k in calib.xtx if k[0] == i]:
                del calib.xtx[key]  # this layer's Hessians are spent (GPTQ used up most; RTN-only linears leave theirs)
            for key, stats in calib.stats.items():
                if key[0] == i:
                    stats.drop_sample()  # and its token samples (--observer mse)
            model = _compact(model, sink, resident)
            run.stream.advance(stream)
    runner.timings.update({k: round(v, 3) for k, v in spent.items()})  # the whole graph's stage names, summed
    quant.quantized = q.quantizes_weights or q.quantizes_activations
    if config.attention == "fused":
        with runner.stage("fuse"):
            model, quant.attention = _fuse(model, sink, config, layers, resident, positions)
        with runner.stage("pack_qkv"):
            model, quant.attention.qkv_packed = _pack_qkv(model, sink, resident)
        with runner.stage("fuse_norms"):  # reads names and shapes only (ε is a small resident constant)
            quant.attention.norms_fused = FuseNorms().run(model, owned=True).report.fused
    if q.head_bits < 16:
        with runner.stage("head"):
            load_initializers(model, [t.name for t in model.graph.initializer
                                      if is_external(t) and t.name not in sink.sunk], source)
            quant.head = runner.apply("head", QuantizeHead(q.head_bits, accuracy_level=q.accuracy_level,
                                                           hessian=calib.head_hessian() if head else None), model).report
            model = _compact(model, sink, resident)
    return model, plans, fold, quant, calib


def _pack_qkv(model: onnx.ModelProto, sink: WeightSink, resident: set[str]) -> tuple[onnx.ModelProto, int]:
    """PackQKV one attention at a time, with its q/k/v tensors read back from the sink."""
    packed = 0
    for gqa in [n.name for n in model.graph.node if n.op_type == "GroupQueryAttention"]:
        with sink.borrowed(model, initializers_read(model, gqa)):
            packed += PackQKV([gqa]).run(model, owned=True).report.layers
        model = _compact(model, sink, resident)
    return model, packed


def _quantized_stream(run: LayerwiseCalibration, model: onnx.ModelProto, sink: WeightSink, i: int) -> list[np.ndarray]:
    """The stream leaving layer ``i`` as compiled so far (weights, Q/DQ points, eager attention)."""
    out = run.cut.outputs[i]
    layer_model = run.stream.layer_model(model, i, [out])
    for tensor in layer_model.graph.initializer:  # copies: the skeleton keeps its references
        if is_external(tensor) and tensor.name in sink.sunk:
            sink.load(tensor)
    return [values[out] for _, values in run.stream.run_layer_model(layer_model, [out])]


def _fuse(model: onnx.ModelProto, sink: WeightSink, config: CompileConfig, layers: list[DecoderLayer],
          resident: set[str], positions: int | None):
    """FuseAttention layer by layer, each with its attention's tensors read back from the sink (the V
    offset folds through out_proj's weight). ``layers``: the records of the uncompiled graph."""
    report = None
    for layer, original in zip(find_layers(model), layers):  # every layer is still eager here
        lins = [lin for pair in zip((layer.k_proj, layer.v_proj, layer.out_proj),
                                    (original.k_proj, original.v_proj, original.out_proj)) for lin in pair]
        nodes = {n for lin in lins for n in (lin.node, lin.bias_node) if n}
        tags = (*nodes, f"L{layer.index}.k.", f"L{layer.index}.v.")  # low-bit forms and K/V Q/DQ points
        names = {t for n in model.graph.node if n.name in nodes or any(tag in n.name for tag in tags) for t in n.input}
        with sink.borrowed(model, names):
            fuse = FuseAttention([layer], cache_bits=config.fused_cache_bits, rotary_positions=positions)
            report = merged(report, fuse.run(model, owned=True).report)
        model = _compact(model, sink, resident)
    return model, report


def _compact(model: onnx.ModelProto, sink: WeightSink, resident: set[str]) -> onnx.ModelProto:
    """Write what is held in memory to the sink and return a fresh copy of the (now small) model: protobuf's
    arena keeps every byte ever set in a message, cleared fields included, until the message is freed."""
    sink.write_loaded(model, keep=resident)
    return copy_model(model)


def merged(total, part):
    """Two reports of one kind as one: counts summed, lists of kinds united, ``by_bits`` summed per width,
    ``scale_range`` widened, everything else as in ``total``."""
    if total is None or part is None:
        return part if total is None else total
    if isinstance(total, QuantizationReport):
        for key in ("weights", "activations", "kv_cache", "attention", "head"):
            setattr(total, key, merged(getattr(total, key), getattr(part, key)))
        total.quantized = total.quantized or part.quantized
        return total
    for f in dataclasses.fields(total):
        a, b = getattr(total, f.name), getattr(part, f.name)
        if f.name in _SUMMED:
            setattr(total, f.name, a + b)
        elif f.name in _UNITED and isinstance(a, list):
            setattr(total, f.name, sorted(set(a) | set(b)))
        elif f.name == "copied_shared":
            setattr(total, f.name, a + b)
        elif f.name == "by_bits":
            setattr(total, f.name, {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))})
        elif f.name == "scale_range" and a and b:
            setattr(total, f.name, [min(a[0], b[0]), max(a[1], b[1])])
    return total
