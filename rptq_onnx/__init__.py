"""rptq-onnx: RPTQ (reorder-based post-training quantization) as an ONNX graph-rewriting compiler."""

from rptq_onnx.errors import RptqError

__version__ = "0.1.0"
__all__ = ["RptqError", "__version__"]
