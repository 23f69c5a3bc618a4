"""`rptq-onnx compile --report`: one Markdown page + PNGs per compile, beside the model.

``report.md`` holds the configuration, stage timings, the cluster plan per layer, the channel-range
plots (R1 and R4 over all layers), the per-point SQNR table and plot (on the first two calibration windows),
the placement summary and the memory table for the model's own shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rptq_onnx.artifacts import MARKDOWN_NAME, REPORT_DIR
from rptq_onnx.compile_report import CompileReport
from rptq_onnx.errors import RptqError
from rptq_onnx.vocabulary import POINTS

def write_report(model_dir: Path, report: CompileReport, windows: np.ndarray) -> Path:
    from rptq_onnx.memory import format_memory_table, resolve_shape
    from rptq_onnx.point_error import format_errors, plot_errors, point_errors, qdq_points
    from rptq_onnx.ranges import plot_ranges

    figs = model_dir / REPORT_DIR
    figs.mkdir(exist_ok=True)
    q, calib = report.quantization, report.calibration
    lines = [f"# rptq-onnx compile report: {q.name} ({report.config.preset})", "",
             f"- source: `{report.source}`; {report.layers} layers; layout {report.layout}, "
             f"{report.gathers_added} Gather(s) added",
             f"- calibration: {calib.windows} × {calib.seqlen} tokens from `{calib.source}`",
             "- timings (s): " + ", ".join(f"{k} {v}" for k, v in report.timings_s.items()),
             f"- peak RSS {report.peak_rss_mb} MB", "",
             f"## Recipe `{report.recipe.name}` (rptq_onnx/recipes.py)", "", "| point | choice |", "|---|---|",
             *(f"| {p} | {c} |" for p, c in report.recipe.choices.items()), "",
             "## Configuration", "", "```json", json.dumps(json.loads(report.config.to_json()), indent=2), "```", "",
             "## Cluster plan (clusters per point; smallest–largest cluster)", "",
             "| layer | R1 | R2 | R3 | R4 | R5 |", "|---:|---|---|---|---|---|"]
    for i, (k, sizes) in enumerate(zip(report.clusters, report.cluster_sizes)):
        lines.append(f"| {i} | " + " | ".join(f"{k[p]} ({sizes[p][0]}–{sizes[p][1]})" if k[p] else "not clustered"
                                               for p in POINTS) + " |")
    lines += ["", "## Channel ranges", ""]
    for point in ("R1", "R4"):
        plot_ranges(model_dir, figs / f"ranges-{point}.png", point=point)
        lines.append(f"![{point} ranges]({REPORT_DIR}/ranges-{point}.png)")
    lines.append("")

    from rptq_onnx.graph import load_model

    if qdq_points(load_model(model_dir / "model.onnx", load_weights=False)):
        err = point_errors(model_dir / "model.onnx", windows)
        plot_errors(err, figs / "sqnr.png")
        lines += ["## Per-point error", "", format_errors(err), "", f"![SQNR by layer]({REPORT_DIR}/sqnr.png)", ""]
    else:
        lines += ["## Per-point error", "", "No activation is quantized in this preset.", ""]

    if q.kv_cache is not None:
        kv = q.kv_cache
        lines += ["## KV cache", "", f"Stored between decode steps as {', '.join(kv.containers)} codes "
                  f"({', '.join(map(str, kv.bits))}-bit) in layout {kv.layout}: real low-bit storage.", ""]
    try:
        shape = resolve_shape(str(model_dir))
        lines += ["## Memory (formula, batch 1, full context)", "",
                  format_memory_table(report.source, shape, 1, shape.positions), ""]
    except RptqError:  # a model without an OPT config record: no memory table
        pass
    lines += ["Activation Q/DQ runs as simulated quantization on ONNX Runtime's CPU and CUDA providers; "
              "`rptq-onnx inspect MODEL --placement` shows which nodes run as real low-bit kernels.", ""]
    out = model_dir / MARKDOWN_NAME
    out.write_text("\n".join(lines))
    return out
