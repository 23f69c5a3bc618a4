"""rptq-onnx: RPTQ (reorder-based post-training quantization) as an ONNX graph-rewriting compiler."""

from pathlib import Path

from rptq_onnx.errors import RptqError

# Installed, passes/ and tools/ are subpackages (rptq_onnx.passes, rptq_onnx.tools: see
# pyproject's package-dir). In a source checkout they sit beside this package: let the import
# system find them there too, so a checkout (or a git worktree) imports its own passes.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "passes" / "__init__.py").is_file():
    __path__.append(str(_checkout))

__version__ = "0.1.0"
__all__ = ["RptqError", "__version__"]
