"""The one factory for ONNX Runtime sessions used everywhere in rptq-onnx.

It picks providers (CUDA when the installed build and the machine have it, else CPU) and
guards against ORT's QDQ fusions: with default options ORT CPU matches per-channel activation
Q/DQ around MatMul/Add and then fails ("Per-Channel is not supported yet"), so every session
disables the QDQ selector/action transformer. Activation QDQ therefore runs as simulated
quantization (dequantize, then float math) on every execution provider.
"""

from __future__ import annotations

import os
import warnings

import onnxruntime as ort

from rptq_onnx.errors import RptqError

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
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """An InferenceSession with the QDQ guard; ``model`` is a path or serialized bytes.

    ``external_data_dir``: for serialized bytes whose initializers point to external data files,
    the directory those files are in (ORT reads them itself; Python holds no copy).
    ``profile_prefix``: enable ORT's profiler, writing ``{prefix}_*.json`` (``end_profiling()``).
    """
    opts = ort.SessionOptions()
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
