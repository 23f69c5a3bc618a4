"""Channel ranges, the RPTQ paper's Fig. 1 for the user's own model (`rptq-onnx inspect --ranges`).

``compile`` saves each layer's calibration min/max per channel (original channel order) in
``ranges.safetensors`` beside the model; this module reads them back and draws each channel as a
(max, min) point coloured by its cluster, with the per-tensor range (dashed box) and every
cluster's range (one box per cluster).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rptq_onnx.artifacts import CLUSTERS_NAME, RANGES_NAME, load_cluster_plans
from rptq_onnx.clustering import ClusterPlan
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import replaced_atomically
from rptq_onnx.vocabulary import POINT_TAPS



def save_ranges(path: Path, stats: dict, layers: int) -> None:
    """Min/max per channel for every plotted tap, as float32 safetensors (deterministic bytes).

    Written with Python's own file mode (0644 under the usual umask, like every other output):
    ``safetensors.save_file`` creates its file 0600."""
    from safetensors.numpy import save

    tensors = {}
    for i in range(layers):
        for tap, _ in POINT_TAPS.values():
            hi, lo = stats[(i, tap)].minmax.range()
            tensors[f"L{i}.{tap}.max"] = np.ascontiguousarray(hi, dtype=np.float32)
            tensors[f"L{i}.{tap}.min"] = np.ascontiguousarray(lo, dtype=np.float32)
    Path(path).write_bytes(save(tensors))


def load_ranges(model_dir: Path) -> dict[str, np.ndarray] | None:
    f = model_dir / RANGES_NAME
    if not f.is_file():
        return None
    from safetensors.numpy import load_file

    return load_file(str(f))


def check_selection(layer: int | None, point: str, layers: int) -> None:
    if point not in POINT_TAPS:
        raise RptqError(f"--point {point} is not a reorder point; use one of {', '.join(POINT_TAPS)}")
    if layer is not None and not 0 <= layer < layers:
        raise RptqError(f"--layer {layer} is out of range: the model has layers 0..{layers - 1}")


def point_data(ranges: dict, plans: list[dict[str, ClusterPlan]], layer: int, point: str) -> dict:
    tap, what = POINT_TAPS[point]
    hi, lo = ranges[f"L{layer}.{tap}.max"], ranges[f"L{layer}.{tap}.min"]
    plan = plans[layer][point]
    if len(hi) != plan.channels:  # the o_proj input of a GQA model: each query head takes its K/V head's plan
        plan = plan.expand_heads(len(hi) // plan.channels)
    labels = plan.labels()
    clusters = []
    for c in range(int(labels.max()) + 1):
        sel = labels == c
        clusters.append({"channels": int(sel.sum()), "max": float(hi[sel].max()), "min": float(lo[sel].min())})
    return {"layer": layer, "point": point, "tensor": what, "max": hi.tolist(), "min": lo.tolist(),
            "cluster": labels.tolist(), "clusters": clusters, "clustered": plan.clustered,
            "per_tensor": {"max": float(hi.max()), "min": float(lo.min())},
            "spread": float((hi - lo).max() / max(np.median(hi - lo), 1e-12))}


def plot_ranges(model_dir: str | os.PathLike, out_png: str | os.PathLike, point: str = "R1",
                layer: int | None = None) -> dict:
    """Write the scatter PNG (one layer, or a grid over all layers) and its data as JSON beside it."""
    model_dir = Path(model_dir)
    model_dir = model_dir.parent if model_dir.suffix == ".onnx" else model_dir
    ranges, plans = load_ranges(model_dir), load_cluster_plans(model_dir)
    if ranges is None or plans is None:
        raise RptqError(f"{model_dir}: no {RANGES_NAME} / {CLUSTERS_NAME} beside the model; --ranges reads the "
                        "calibration statistics that `rptq-onnx compile` saves, so compile the model first")
    check_selection(layer, point, len(plans))
    chosen = [layer] if layer is not None else list(range(len(plans)))
    data = [point_data(ranges, plans, i, point) for i in chosen]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(4, len(data))
    rows = (len(data) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.4, 4.2 * cols), 4.0 * rows), squeeze=False)  # room for the title
    cmap = plt.get_cmap("tab20")
    for ax, d in zip(axes.flat, data):
        hi, lo, lab = np.array(d["max"]), np.array(d["min"]), np.array(d["cluster"])
        ax.scatter(hi, lo, c=[cmap(c % 20) for c in lab], s=6, linewidths=0)
        for c, cl in enumerate(d["clusters"]):
            sel = lab == c
            x0, y0 = hi[sel].min(), lo[sel].min()
            ax.add_patch(Rectangle((x0, y0), hi[sel].max() - x0, lo[sel].max() - y0, fill=False,
                                   edgecolor=cmap(c % 20), lw=0.7))
            ax.plot(cl["max"], cl["min"], marker="x", color=cmap(c % 20), ms=5)  # the cluster's quantization range
        pt = d["per_tensor"]
        ax.axvline(pt["max"], color="k", ls="--", lw=0.8)
        ax.axhline(pt["min"], color="k", ls="--", lw=0.8)
        ax.plot(pt["max"], pt["min"], marker="X", color="k", ms=7)
        title = f"{len(d['clusters'])} clusters" if d.get("clustered", True) else "not clustered"
        ax.set_title(f"layer {d['layer']} {point}: {title}", fontsize=9)
        ax.set_xlabel("channel max")
        ax.set_ylabel("channel min")
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    fig.suptitle(f"{point} {POINT_TAPS[point][1]}: each channel's (max, min), coloured by cluster\n"
                 "black X + dashed: per-tensor range; boxes: clusters; x: each cluster's quantization range",
                 fontsize=9)
    fig.tight_layout()
    out_png, out_json = Path(out_png), Path(out_png).with_suffix(".json")
    with replaced_atomically(out_png) as tmp:
        fig.savefig(tmp, dpi=110, metadata={"Software": None})  # no version/date stamps: same input → same bytes
    plt.close(fig)
    with replaced_atomically(out_json) as tmp:
        tmp.write_text(json.dumps({"model": str(model_dir), "point": point, "layers": data}) + "\n")
    return {"png": str(out_png), "json": str(out_json), "layers": len(data)}
