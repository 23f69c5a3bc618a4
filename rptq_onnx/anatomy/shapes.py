"""Static tensor shapes for the layer map (head counts, LayerNorm axes), by ONNX shape inference."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import shape_inference


def infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, list], str | None]:
    """Static shapes by ONNX shape inference (with data propagation), run on a weight-free copy, and why
    inference failed (None when it did not). On failure the shapes the graph declares are used and a
    warning names the graph and the reason."""
    light = onnx.ModelProto()
    _copy_without_weights(model, light)
    error = None
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception as e:  # noqa: BLE001  (any failure: fall back to the declared shapes, say why)
        inferred = light
        error = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        warnings.warn(f"ONNX shape inference failed on graph '{model.graph.name}' ({error}); the layer map uses "
                      "the shapes the graph declares", RuntimeWarning, stacklevel=3)
    shapes: dict[str, list] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return shapes, error


def _copy_without_weights(model: onnx.ModelProto, dest: onnx.ModelProto) -> None:
    dest.ir_version = model.ir_version
    dest.opset_import.extend(model.opset_import)
    g = dest.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= 64:
            g.initializer.append(init)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (``TensorProto`` enum) of every tensor ONNX type inference can name, on a weight-free copy."""
    light = onnx.ModelProto()
    _copy_without_weights(model, light)
    try:
        inferred = shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001  (the declared types are what is left)
        inferred = light
    types = {t.name: t.data_type for t in model.graph.initializer}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types
