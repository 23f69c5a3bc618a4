"""Names and defaults the command line needs before any heavy import (no onnx, torch or numpy here).

``rptq-onnx --help`` and usage errors are answered from this module, ``config`` and ``errors`` alone.
"""

POINTS = ("R1", "R2", "R3", "R4", "R5")  # the RPTQ reorder points (see anatomy.py)

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(18, 24)
EXPORTERS = ("dynamo", "torchscript")

# node-name prefix of everything passes/quantize_weights.py adds; kept source grids add an offset term
# ("<prefix>.offset_term" MatMul on shared "rptq.w.block_sums.*", then an Add named "<prefix>.add_offset")
WEIGHT_PREFIX = "rptq.w."
BLOCK_SUMS_PREFIX = WEIGHT_PREFIX + "block_sums."
OFFSET_ADD_SUFFIX = ".add_offset"
