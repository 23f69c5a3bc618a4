"""`rptq-onnx inspect`: the layer map and graph facts of an ONNX model, as a table or JSON."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import onnx

from rptq_onnx.anatomy import map_model
from rptq_onnx.artifacts import load_cluster_plans
from rptq_onnx.config import ClusterCounts
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex, load_model
from rptq_onnx.vocabulary import ATTENTION_PREFIX, CONFIG_KEY, QDQ_LABELS, QDQ_PREFIX


def describe(model_path: str | os.PathLike) -> dict:
    """Everything `inspect` prints, as plain data (JSON-serialisable)."""
    model = load_model(model_path, load_weights=False)
    if any(n.op_type == "GroupQueryAttention" and n.name.startswith(ATTENTION_PREFIX) for n in model.graph.node):
        return _describe_fused(model_path, model)
    mm = map_model(model)
    compiled = _compile_config(model)
    plans = load_cluster_plans(model_path)
    if plans is not None and len(plans) != len(mm.layers):
        raise RptqError(f"{model_path}: clusters.json describes {len(plans)} layers but the graph has {len(mm.layers)}; "
                        "recompile the model")
    per_tensor = _per_tensor_points(compiled)
    layers = []
    for i, layer in enumerate(mm.layers):
        d = layer.to_dict()
        d["shared_weights"] = sorted({w for w in _weights(layer) if mm.is_shared(w)})
        if plans is not None:
            d["clusters"] = _cluster_summary(plans[i], per_tensor)
        layers.append(d)
    return {
        "model": str(model_path),
        "family": mm.layers[0].family if mm.layers else None,
        "num_layers": len(mm.layers),
        "with_past": mm.with_past,
        "cache": _cache_storage(model, mm.layers) if mm.with_past else None,
        **_graph_facts(model),
        "shared_initializers": sorted(mm.shared_initializers),
        "layers": layers,
        "quantization": quantization_summary(model, mm.layers) if compiled else None,
    }


def _graph_facts(model: onnx.ModelProto) -> dict:
    """What `inspect` says of any graph: opset, I/O, op counts, initializer bytes, the compile config."""
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}],
        "outputs": [v.name for v in model.graph.output],
        "node_count": len(model.graph.node),
        "op_counts": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "initializer_bytes": _initializer_bytes(model),
        "compiled": _compile_config(model),
    }


def _cluster_summary(plans: dict, per_tensor: set[str]) -> dict:
    """One layer's cluster plans as `inspect` shows them (``per_tensor``: points compiled with one scale)."""
    return {p: {"k": plan.num_clusters, "sizes": plan.cluster_sizes(), "heads": plan.heads,
                "clustered": plan.clustered, "per_tensor": p in per_tensor} for p, plan in plans.items()}


def _per_tensor_points(compiled: dict | None) -> set[str]:
    clusters = (compiled or {}).get("clusters")
    return set(ClusterCounts.from_dict(clusters).per_tensor_points()) if clusters else set()


def _initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    init_bytes: Counter[str] = Counter()
    for init in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims)) if init.dims else 1
        bits = 4 if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else dtype.itemsize * 8
        init_bytes[onnx.helper.tensor_dtype_to_string(init.data_type).removeprefix("TensorProto.").lower()] += (count * bits + 7) // 8
    return dict(sorted(init_bytes.items()))


def _describe_fused(model_path, model: onnx.ModelProto) -> dict:
    """A graph whose attention rptq-onnx fused into GroupQueryAttention: the layer map's eager anchors
    (QKᵀ, Softmax) are gone, so layers are read off the GQA nodes and the compile's clusters.json."""
    plans = load_cluster_plans(model_path)
    facts = _graph_facts(model)
    per_tensor = _per_tensor_points(facts["compiled"])
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    layers = []
    for i, node in enumerate(gqa):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        d = {"index": i, "attention": node.name, "num_heads": attrs["num_heads"], "num_kv_heads": attrs["kv_num_heads"],
             "kv_cache_bits": attrs.get("kv_cache_bit_width", 0) or None, "past_key": node.input[3],
             "present_key": node.output[1]}
        if plans is not None and i < len(plans):
            d["clusters"] = _cluster_summary(plans[i], per_tensor)
        layers.append(d)
    past = next((v for v in model.graph.input if v.name.startswith("past_key_values.")), None)
    cache = None
    if past is not None:
        t = past.type.tensor_type
        cache = {"dtype": onnx.helper.tensor_dtype_to_string(t.elem_type).removeprefix("TensorProto.").lower(),
                 "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
                 "bits": layers[0]["kv_cache_bits"] if layers else None}
    return {"model": str(model_path), "fused_attention": True, "family": None, "num_layers": len(layers),
            "with_past": past is not None, "cache": cache, **facts, "shared_initializers": [], "layers": layers,
            "quantization": None}


def _format_fused(desc: dict) -> list[str]:
    lines = [f"{desc['model']}: {desc['num_layers']} decoder layers, attention fused into "
             "com.microsoft:GroupQueryAttention (rptq-onnx --attention fused)"]
    cache = desc["cache"]
    if cache:
        bits = f"int{cache['bits']}" if cache["bits"] else "float"
        lines.append(f"KV cache  {bits} per-channel, held by the kernel: {cache['dtype']} {cache['shape']}")
    for layer in desc["layers"]:
        cells = [f"{p} k={c['k']}" if c["clustered"] else f"{p} not clustered"
                 for p, c in layer.get("clusters", {}).items()]
        lines.append(f"  layer {layer['index']}: {layer['num_heads']} heads / {layer['num_kv_heads']} kv heads"
                     + (f"   clusters {' '.join(cells)}" if cells else ""))
    return lines




def quantization_summary(model: onnx.ModelProto, layers) -> list[dict]:
    """Per layer: each Q/DQ point (bits, clusters, scale range) and each linear's execution verdict."""
    index = GraphIndex(model)
    wbits = ((_compile_config(model) or {}).get("quant") or {}).get("wbits")
    out = []
    for layer in layers:
        points = {}
        for tag, label in QDQ_LABELS.items():
            q = index.node_by_name.get(f"{QDQ_PREFIX}L{layer.index}.{tag}.quantize")
            if q is None:
                continue
            scale = np.atleast_1d(index.constant_value(q.input[1])).astype(np.float64)
            zp = np.atleast_1d(index.constant_value(q.input[2])).astype(np.int64)
            clip = index.node_by_name.get(f"{QDQ_PREFIX}L{layer.index}.{tag}.clip")
            if clip is not None:
                bits = int(index.constant_value(clip.input[2])).bit_length()
            else:
                bits = 4 if index.initializers[q.input[2]].data_type == onnx.TensorProto.UINT4 else 8
            clusters = len({(float(s), int(z)) for s, z in zip(scale, zp)})
            points[label] = {"bits": bits, "clusters": clusters, "scale_min": float(scale.min()),
                             "scale_max": float(scale.max()), "simulated": True}
        linears = {role: _verdict(index, lin, wbits) for role, lin in layer.linears().items()}
        out.append({"layer": layer.index, "points": points, "linears": linears})
    return out


def _verdict(index: GraphIndex, lin, wbits: int | None = None) -> dict:
    """How a linear runs; ``weight_bits`` are the codes' bits (the compile's --wbits), ``storage_bits`` the
    container's (3-bit codes live in 4-bit storage)."""
    if lin.op == "MatMulNBits":
        node = index.node_by_name[lin.node]
        storage = int(next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"))
        bits = wbits if wbits and wbits < storage else storage
        return {"op": "MatMulNBits", "weight_bits": bits, "storage_bits": storage,
                "execution": "real low-bit kernel (MatMulNBits)"}
    if lin.weight_dq:
        dtype = index.initializers[lin.weight].data_type
        storage = 4 if dtype in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4) else 8
        bits = wbits if wbits and wbits < storage else storage
        return {"op": f"DequantizeLinear+{lin.op}", "weight_bits": bits, "storage_bits": storage,
                "execution": f"simulated: {bits}-bit weights in the file, dequantized to float for the GEMM"}
    return {"op": lin.op, "weight_bits": 32, "storage_bits": 32, "execution": "float"}


def _compile_config(model: onnx.ModelProto) -> dict | None:
    """The stamped compile config; cluster specs as "ch" / "tensor" also where an older compile wrote 0 / −1."""
    props = {p.key: p.value for p in model.metadata_props}
    if CONFIG_KEY not in props:
        return None
    config = json.loads(props[CONFIG_KEY])
    if config.get("clusters"):
        config["clusters"] = ClusterCounts.from_dict(config["clusters"]).as_dict()
    return config


def _preset_label(compiled: dict | None) -> str:
    """``W4A4KV`` or, when --wbits/--abits/--kv-only overrode the preset, ``W4A4KV = W16A4KV``."""
    if not compiled:
        return "?"
    q = compiled.get("quant", {})
    name = f"W{q.get('wbits', 16)}A{q.get('abits', 16)}" + ("KV" if q.get("kv_only") and q.get("abits", 16) < 16 else "")
    preset = compiled.get("preset", "?")
    return preset if preset == name or preset in ("reorder", "W16A16") and name == "W16A16" else f"{preset} = {name}"


def _weights(layer) -> list[str]:
    names = []
    for lin in layer.linears().values():
        names += [lin.weight] + ([lin.bias] if lin.bias else [])
    for norm in (layer.attn_norm, layer.final_norm):
        names += [norm.weight] + ([norm.bias] if norm.bias else [])
    return names


def _cache_storage(model: onnx.ModelProto, layers) -> dict:
    """How the cache crosses decode steps: the element type and shape of the past inputs."""
    inputs = {v.name: v for v in model.graph.input}
    t = inputs[layers[0].past_key].type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_string(t.elem_type).removeprefix("TensorProto.").lower()
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    low_bit = dtype in ("uint4", "uint8", "int4", "int8")
    return {"dtype": dtype, "shape": dims,
            "storage": "real low-bit codes held between decode steps" if low_bit else "float"}


def _cache_line(cache: dict) -> str:
    return f"present/past K/V, {cache['dtype']} [{', '.join(map(str, cache['shape']))}] ({cache['storage']})"


def format_table(desc: dict) -> str:
    """A human-readable rendering of :func:`describe`."""
    if desc.get("fused_attention"):
        return "\n".join(_format_fused(desc) + _format_footer(desc))
    lines = [f"model     {desc['model']}",
             f"family    {desc['family']}   opset {desc['opset']}   layers {desc['num_layers']}   "
             f"cache {_cache_line(desc['cache']) if desc['with_past'] else 'none'}",
             ""]
    llama = desc["family"] == "llama"
    header = ["layer", "heads×dim" + (" (kv)" if llama else ""), "R1 attn-norm out",
              "R2 q / k after RoPE" if llama else "R2 q_proj / k_proj out", "R3 out_proj in", "R4 final-norm out",
              "R5 down_proj in" if llama else "R5 fc2 in", "K / V (present)"]
    rows = []
    for layer in desc["layers"]:
        pts, ch = layer["points"], layer["point_channels"]
        kv = f"{layer['present_key']} / {layer['present_value']}" if layer["present_key"] else "k_proj / v_proj out"
        kv_heads = f" ({layer['num_kv_heads']})" if llama else ""
        q_ch, kv_ch = layer["num_heads"] * layer["head_dim"], layer["num_kv_heads"] * layer["head_dim"]
        qk_channels = f"{q_ch}" if q_ch == kv_ch else f"{q_ch} / {kv_ch}"  # channels of the tensors
        rows.append([str(layer["index"]), f"{layer['num_heads']}×{layer['head_dim']}{kv_heads}",
                     f"{pts['R1'][0]} [{ch['R1']}]", f"{pts['R2'][0]} / {pts['R2'][1]} [{qk_channels}]",
                     f"{pts['R3'][0]} [{q_ch}]", f"{pts['R4'][0]} [{ch['R4']}]", f"{pts['R5'][0]} [{ch['R5']}]", kv])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if desc["layers"] and "clusters" in desc["layers"][0]:
        lines += ["", f"clusters  (k per point; R2/R3 per head; smallest–largest cluster)  preset "
                      f"{_preset_label(desc['compiled'])}, layout {(desc['compiled'] or {}).get('layout', '?')}"]
        for layer in desc["layers"]:
            cells = []
            for p, c in layer["clusters"].items():
                if not c.get("clustered", True):
                    cells.append(f"{p} not clustered")
                    continue
                if c.get("per_tensor"):
                    cells.append(f"{p} k=1 (one scale per tensor)")
                    continue
                per_head = f" ({c['k'] // c['heads']}/head)" if c["heads"] > 1 else ""
                per_head = per_head.replace("/head", "/kv head") if llama and c["heads"] > 1 else per_head
                cells.append(f"{p} k={c['k']}{per_head} {min(c['sizes'])}–{max(c['sizes'])}")
            lines.append(f"  layer {layer['index']}: " + "   ".join(cells))
    if desc.get("quantization"):
        lines += ["", f"quantization  {_preset_label(desc['compiled'])}: bits / clusters / scale range per "
                      "point; activation Q/DQ is simulated (float math) on ORT's CPU and CUDA providers"]
        for layer in desc["quantization"]:
            cells = [f"{p} {v['bits']}b k={v['clusters']} [{v['scale_min']:.2g}, {v['scale_max']:.2g}]"
                     for p, v in layer["points"].items()]
            verdicts = sorted({f"{v['op']} w{v['weight_bits']}" + (f" (in {v['storage_bits']}-bit storage)"
                                                                  if v["storage_bits"] != v["weight_bits"] else "")
                               for v in layer["linears"].values()})
            lines.append(f"  layer {layer['layer']}: " + ("   ".join(cells) or "no activation Q/DQ"))
            lines.append(f"           linears: {', '.join(verdicts)}")
    return "\n".join(lines + _format_footer(desc))


def _format_footer(desc: dict) -> list[str]:
    lines = [""]
    lines.append(f"nodes     {desc['node_count']}: " + ", ".join(f"{k} {v}" for k, v in
                                                              sorted(desc["op_counts"].items(), key=lambda kv: -kv[1])))
    lines.append("weights   " + ", ".join(f"{k} {_human(v)}" for k, v in desc["initializer_bytes"].items()))
    shared = desc["shared_initializers"]
    lines.append(f"shared    {len(shared)} initializer(s) read by more than one node" +
                 (f" ({', '.join(shared[:4])}{', …' if len(shared) > 4 else ''})" if shared else ""))
    lines.append(f"inputs    {', '.join(desc['inputs'][:4])}{', …' if len(desc['inputs']) > 4 else ''}")
    lines.append(f"outputs   {', '.join(desc['outputs'][:4])}{', …' if len(desc['outputs']) > 4 else ''}")
    return lines


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
