"""Names and defaults the command line needs before any heavy import (no onnx, torch or numpy here).

``rptq-onnx --help`` and usage errors are answered from this module, ``config`` and ``errors`` alone.
"""

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(18, 24)
EXPORTERS = ("dynamo", "torchscript")

