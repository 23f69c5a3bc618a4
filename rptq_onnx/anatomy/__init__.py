"""Where the RPTQ reorder points are: a typed map of every decoder layer in an ONNX graph.

Two families share one record (``DecoderLayer``): pre-LN **OPT** and **Llama** (RMSNorm, RoPE,
grouped-query attention, SwiGLU). Matching is structural, never by tensor or node names (the
dynamo exporter generates names like ``node_MatMul_106``; the TorchScript exporter uses scope
paths). Each attention block is anchored on its ``Softmax``; from there the pattern is walked
through the data path.

The package: ``records`` (DecoderLayer, Linear, Norm, Rope, ModelMap), ``walk`` (the data-path
walks both families share), ``opt`` and ``llama`` (each family's norms, RoPE and MLP, with its
pattern drawn), ``cache`` (present/past K/V), ``shapes`` (shape inference), and ``layers``
(``map_model``: one layer per attention Softmax).

R-points (README "Reorder points"; ``vocabulary.TAP_POINTS`` maps every tap and Q/DQ point to one):
    R1  attention-norm output                 (→ rows of q/k/v)
    R2  OPT: q_proj and k_proj outputs;       (one shared permutation, per head; Llama: per K/V
        Llama: q and k after RoPE              head, moving RoPE pairs (i, i + D/2) together)
    R3  out_proj input                        (channels of v, per head; Llama: per K/V head)
    R4  final / post-attention norm output    (→ rows of fc1, or of gate_proj and up_proj)
    R5  fc2 / down_proj input                 (after the activation / the SwiGLU product)
"""

from rptq_onnx.anatomy.layers import find_layers, map_model
from rptq_onnx.anatomy.records import DecoderLayer, Linear, ModelMap, Norm, Rope
from rptq_onnx.vocabulary import POINTS, QDQ_LABELS, TAP_POINTS  # for imports that predate vocabulary.py

__all__ = ["DecoderLayer", "Linear", "ModelMap", "Norm", "Rope", "find_layers", "map_model",
           "POINTS", "QDQ_LABELS", "TAP_POINTS"]
