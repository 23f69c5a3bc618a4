"""The one factory for ONNX Runtime sessions used everywhere in rptq-onnx.

It picks providers (CUDA when the installed build and the machine have it, else CPU) and
guards against ORT's QDQ fusions: with default options ORT CPU matches per-channel activation
Q/DQ around MatMul/Add and then fails ("Per-Channel is not supported yet"), so every session
disables the QDQ selector/action transformer. Activation QDQ therefore runs as simulated
quantization (dequantize, then float math) on every execution provider.

``feeds_for`` builds a session's inputs for a prefill of whole windows (mask, positions, empty past).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from rptq_onnx.errors import RptqError

if TYPE_CHECKING:
    from rptq_onnx.anatomy import DecoderLayer

QDQ_GUARD = ["QDQSelectorActionTransformer"]
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and _cuda_device_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_device_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def make_session(model: str | os.PathLike | bytes, providers: list[str] | None = None, optimization: str = "all",
                 threads: int | None = None, external_data_dir: str | os.PathLike | None = None,
                 profile_prefix: str | None = None, arena: bool = True) -> ort.InferenceSession:
    """An InferenceSession with the QDQ guard; ``model`` is a path or serialized bytes.

    ``external_data_dir``: for serialized bytes whose initializers point to external data files,
    the directory those files are in (ORT reads them itself; Python holds no copy).
    ``profile_prefix``: enable ORT's profiler, writing ``{prefix}_*.json`` (``end_profiling()``).
    ``arena``: False frees each buffer when done instead of keeping ORT's CPU arena at its peak, and
    keeps no prepacked copy of the weights (short sessions that run a few large batches, as a
    layer-wise compile's).
    """
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    if not arena:  # nor a prepacked second copy of the weights
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if external_data_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    opts.graph_optimization_level = LEVELS[optimization]
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
    providers = providers or default_providers()
    src = model if isinstance(model, bytes) else str(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ort.InferenceSession(src, opts, providers=providers, disabled_optimizers=QDQ_GUARD)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise RptqError(f"ONNX Runtime could not load the model ({reason})") from None


def numpy_outputs(session: ort.InferenceSession) -> list[str]:
    """Output names ``session.run`` can return as NumPy arrays (not the 4-bit KV-cache outputs)."""
    return [o.name for o in session.get_outputs() if o.type not in ("tensor(uint4)", "tensor(int4)")]


def as_ort_values(feed: dict) -> dict[str, ort.OrtValue]:
    """``feed`` with NumPy arrays wrapped as OrtValues (for ``run_with_ort_values`` / IOBinding)."""
    return {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}


def run_into(session: ort.InferenceSession, outputs: list[str], feed: dict, into: dict[str, np.ndarray]) -> list:
    """``session.run(outputs, feed)``, with each output named in ``into`` written by ONNX Runtime straight
    into that preallocated array (shape and dtype must match). ``run`` hands back copies: a [C, C] XᵀX
    output would exist twice per run (1 GiB each for C = 16,384), and again while the last batch's is held."""
    if not into:
        return session.run(outputs, feed)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in outputs:
        if name in into:
            buf = into[name]
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    got = binding.get_outputs()
    return [into[name] if name in into else got[k].numpy() for k, name in enumerate(outputs)]


def position_ids(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last ``seq`` tokens from the mask, as Hugging Face derives them for left
    padding: count of attended tokens before each one, 1 on padding (masked anyway)."""
    pos = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    pos = np.where(attention_mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, -seq:])


def feeds_for(session, input_ids: np.ndarray, layers: list[DecoderLayer] | None = None) -> dict:
    """Inputs for a prefill of full windows: all-ones mask, positions 0.., empty past for with-past graphs.

    Past shapes come from the layer map when given, else from the session's input shapes
    ([batch, kv_heads, past, head_dim] float as ``export`` writes them, or [batch, channels, past]
    low-bit codes after the KV-cache pass, fed as an empty OrtValue).
    """
    b = input_ids.shape[0]
    feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    by_name = {}
    for layer in layers or []:
        by_name[layer.past_key] = by_name[layer.past_value] = (layer.num_kv_heads, layer.head_dim)
    for inp in session.get_inputs():
        if inp.name in feed:
            continue
        if inp.name == "position_ids":
            feed[inp.name] = position_ids(feed["attention_mask"], input_ids.shape[1])
            continue
        if inp.type != "tensor(float)" and len(inp.shape) == 3 and isinstance(inp.shape[1], int):
            feed[inp.name] = empty_cache(inp.type, b, inp.shape[1])
            continue
        dims = by_name.get(inp.name)
        if dims is None and len(inp.shape) == 4 and all(isinstance(d, int) for d in (inp.shape[1], inp.shape[3])):
            dims = (inp.shape[1], inp.shape[3])
        if dims is None:
            raise RptqError(f"the graph has an input '{inp.name}' that rptq-onnx does not know how to feed")
        if isinstance(inp.shape[3], int):  # fused attention's int8 / packed 4-bit cache: [B, kv_heads, T, D or D/2]
            dims = (dims[0], inp.shape[3])
        dtype = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8}.get(inp.type, np.float32)
        feed[inp.name] = np.zeros((b, dims[0], 0, dims[1]), dtype)
    return feed


def empty_cache(ort_type: str, batch: int, channels: int):
    """An empty low-bit past [batch, channels, 0] (an OrtValue: 4-bit types cannot cross NumPy)."""
    from onnx import TensorProto

    elem = {"tensor(uint4)": TensorProto.UINT4, "tensor(uint8)": TensorProto.UINT8}.get(ort_type)
    if elem is None:
        raise RptqError(f"a cache input of type {ort_type} is not one rptq-onnx writes")
    return ort.OrtValue.ortvalue_from_shape_and_type([batch, channels, 0], elem)
