"""Where did the accuracy go? Per-point SQNR and logits divergence (`rptq-onnx inspect --error`).

Two runs of the compiled graph on the same windows:

- *quantized*: as compiled, with every activation Q/DQ point's input and dequantized output exposed;
- *float*: the same graph with every activation Q/DQ point bypassed (weights stay as compiled,
  so this isolates activation quantization).

Per layer and point: the **local SQNR** 10·log10(Σx² / Σ(x − q(x))²) of the point's own rounding
(its input vs its dequantized output in the quantized run), and the **accumulated SQNR** of the
quantized run's dequantized tensor vs the float run's tensor (all upstream error included). For
the logits: mean KL(float ‖ quantized) per token and the top-1 agreement.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx

from rptq_onnx.artifacts import REPORT_NAME
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import load_model, rename_inputs, replaced_atomically
from rptq_onnx.vocabulary import LAYOUT_PREFIX, QDQ_LABELS, QDQ_PREFIX

QDQ_NAME = re.compile(rf"^{re.escape(QDQ_PREFIX)}L(\d+)\.(\w+)\.quantize$")


def qdq_points(model: onnx.ModelProto) -> list[tuple[int, str, str, str]]:
    """(layer, tap, input tensor, dequantized tensor) of every activation Q/DQ point."""
    points = []
    for node in model.graph.node:
        m = QDQ_NAME.match(node.name)
        if m:
            points.append((int(m.group(1)), m.group(2), node.input[0], f"{QDQ_PREFIX}L{m.group(1)}.{m.group(2)}.dq"))
    return points


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    return out


def bypassed(model: onnx.ModelProto, points) -> onnx.ModelProto:
    """The graph with the activation Q/DQ of ``points`` (from ``qdq_points``) removed: readers of ``.dq``
    read the input again."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rename = {dq: src for _, _, src, dq in points}
    prefixes = tuple(f"{QDQ_PREFIX}L{layer}.{tap}." for layer, tap, _, _ in points)
    keep = [n for n in out.graph.node if not n.name.startswith(prefixes)]
    rename_inputs(keep, rename)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def point_errors(model_path: str | os.PathLike, windows: np.ndarray) -> dict:
    from rptq_onnx.runtime import feeds_for, make_session

    path = Path(model_path)
    path = path / "model.onnx" if path.is_dir() else path
    model = load_model(path)
    points = qdq_points(model)
    if not points:
        raise RptqError(f"{path}: no rptq-onnx activation Q/DQ points; --error needs a model compiled with a preset "
                        "that quantizes activations (rptq-onnx compile --preset W4A4 …)")
    produced = {o for n in model.graph.node for o in n.output}
    # a point that keeps the first token in float (passes/emit_qdq.py): its readers see .first.out, not .dq
    points = [(layer, tap, src, first if (first := f"{LAYOUT_PREFIX}L{layer}.{tap}.first.out") in produced else dq)
              for layer, tap, src, dq in points]
    quant_names = [n for _, _, src, dq in points for n in (src, dq)]
    float_names = [src for _, _, src, _ in points]
    quant = make_session(_with_outputs(model, quant_names).SerializeToString(), external_data_dir=path.parent)
    flt = make_session(_with_outputs(bypassed(model, qdq_points(model)), float_names).SerializeToString(),
                       external_data_dir=path.parent)
    sums: dict[tuple[int, str], list[float]] = {}
    kl_total, agree, tokens = 0.0, 0, 0
    for row in windows:
        ids = row[None]
        q = dict(zip(["logits", *quant_names], quant.run(["logits", *quant_names], feeds_for(quant, ids))))
        f = dict(zip(["logits", *float_names], flt.run(["logits", *float_names], feeds_for(flt, ids))))
        for layer, tap, src, dq in points:
            acc = sums.setdefault((layer, tap), [0.0, 0.0, 0.0, 0.0])
            x, xq, xf = q[src].astype(np.float64), q[dq].astype(np.float64), f[src].astype(np.float64)
            acc[0] += float((x ** 2).sum())
            acc[1] += float(((x - xq) ** 2).sum())
            acc[2] += float((xf ** 2).sum())
            acc[3] += float(((xf - xq) ** 2).sum())
        lf, lq = f["logits"][0].astype(np.float64), q["logits"][0].astype(np.float64)
        pf, lpf, lpq = _softmax(lf), _log_softmax(lf), _log_softmax(lq)
        kl_total += float((pf * (lpf - lpq)).sum())
        agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        tokens += lf.shape[0]

    def db(signal, noise):
        return float("inf") if noise == 0 else float(10 * np.log10(max(signal, 1e-30) / noise))

    rows = [{"layer": layer, "point": tap, "label": QDQ_LABELS.get(tap, tap),
             "local_sqnr_db": db(a[0], a[1]), "accumulated_sqnr_db": db(a[2], a[3])}
            for (layer, tap), a in sorted(sums.items(), key=lambda kv: (kv[0][0], list(QDQ_LABELS).index(kv[0][1])
                                                                         if kv[0][1] in QDQ_LABELS else 99))]
    return {"model": str(path), "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "rows": rows,
            "logits": {"kl_per_token": kl_total / tokens, "top1_agreement": agree / tokens},
            "recipe": _recipe(path.parent)}


def _recipe(folder: Path) -> dict | None:
    """The recipe and its choices per point, from the report.json `compile` wrote beside the model."""
    try:
        return json.loads((folder / REPORT_NAME).read_text()).get("recipe")
    except (OSError, ValueError):
        return None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def format_errors(report: dict) -> str:
    lines = [f"per-point error of {report['model']} on {report['windows']} × {report['seqlen']} tokens "
             "(weights as compiled; float = activation Q/DQ bypassed)", "",
             "| layer | point | local SQNR dB | accumulated SQNR dB |", "|---:|---|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['layer']} | {r['label']} | {r['local_sqnr_db']:.1f} | {r['accumulated_sqnr_db']:.1f} |")
    lg = report["logits"]
    lines += ["", f"logits: KL(float ‖ quantized) {lg['kl_per_token']:.4f} nats/token, top-1 agreement "
              f"{100 * lg['top1_agreement']:.1f} %"]
    worst = min(report["rows"], key=lambda r: r["local_sqnr_db"])
    lines.append(f"lowest local SQNR: layer {worst['layer']} {worst['label']} ({worst['local_sqnr_db']:.1f} dB)")
    if report.get("recipe"):
        lines += ["", f"recipe {report['recipe']['name']}:"]
        lines += [f"  {point}: {choice}" for point, choice in report["recipe"]["choices"].items()]
    return "\n".join(lines)


def plot_errors(report: dict, out_png: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_point: dict[str, list[tuple[int, float]]] = {}
    for r in report["rows"]:
        by_point.setdefault(r["label"], []).append((r["layer"], r["local_sqnr_db"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in by_point.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("local SQNR (dB)")
    ax.set_title("SQNR of each quantization point (higher is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out_png = Path(out_png)
    with replaced_atomically(out_png) as tmp:
        fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    with replaced_atomically(out_png.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(report) + "\n")
