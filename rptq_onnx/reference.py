"""An independent NumPy forward of one compiled OPT decoder layer, to check the ONNX graph.

(Llama layers are checked point by point instead: ``tests/test_llama.py`` recomputes every Q/DQ
point, including the per-(head, channel) ones after RoPE, from its input.)

It reads the layer's parameters and Q/DQ parameters out of a compiled model (weights are
dequantized here from their integer codes, not by ONNX Runtime) and recomputes the layer in
float32 with fake quantization at the same points. Used by the tests: integer codes at every
Q/DQ point must equal ONNX Runtime's, and the layer output must match within float
accumulation error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from rptq_onnx.anatomy import Linear, Norm, DecoderLayer
from rptq_onnx.graph import GraphIndex
from rptq_onnx.quant import dequantized_weight
from rptq_onnx.vocabulary import LAYOUT_PREFIX, QDQ_PREFIX


@dataclass(frozen=True)
class RefQDQ:
    scale: np.ndarray
    zero_point: np.ndarray
    qmax: int

    def codes(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x.astype(np.float32) / self.scale) + self.zero_point, 0, self.qmax).astype(np.int64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((self.codes(x) - self.zero_point) * self.scale).astype(np.float32)


class LayerReference:
    """Parameters of one layer, read from a compiled graph, and its NumPy forward."""

    def __init__(self, model: onnx.ModelProto, layer: DecoderLayer):
        if layer.family != "opt":
            raise ValueError(f"LayerReference recomputes OPT layers; layer {layer.index} is {layer.family}")
        self.g = GraphIndex(model)
        self.layer = layer
        self.qdq: dict[str, RefQDQ] = {}
        self.qdq_input: dict[str, str] = {}
        for node in self.g.nodes:
            if node.op_type == "QuantizeLinear" and node.name.startswith(f"{QDQ_PREFIX}L{layer.index}."):
                tag = node.name.split(".")[3]
                qmax = 255
                clip = next((n for n in self.g.consumers.get(node.output[0], []) if n.op_type == "Clip"), None)
                zp_t = self.g.initializers[node.input[2]]
                if zp_t.data_type == onnx.TensorProto.UINT4:
                    qmax = 15
                if clip is not None:
                    qmax = int(self.g.constant_value(clip.input[2]))
                self.qdq[tag] = RefQDQ(self.const(node.input[1]).astype(np.float32),
                                       self.const(node.input[2]).astype(np.int64), qmax)
                self.qdq_input[tag] = node.input[0]
        # points quantized relative to each row's maximum (passes/emit_qdq.py, the softmax output's default)
        self.row_max = {tag for tag in self.qdq if f"{LAYOUT_PREFIX}L{layer.index}.{tag}.rescale" in self.g.node_by_name}
        # points that pass each sequence's first token through in float (--first-token float)
        self.keep_first = {tag for tag in self.qdq if f"{LAYOUT_PREFIX}L{layer.index}.{tag}.first.out" in self.g.node_by_name}
        self.seq = 0  # tokens per sequence of the forward in progress

    def const(self, name: str) -> np.ndarray:
        return np.asarray(self.g.constant_value(name))

    def weight(self, lin: Linear) -> np.ndarray:
        """The weight as [in, out] float32, dequantized from its codes when stored low-bit."""
        return dequantized_weight(self.g, lin)

    def linear(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        y = x @ self.weight(lin)
        return y + self.const(lin.bias) if lin.bias else y

    def norm(self, x: np.ndarray, norm: Norm) -> np.ndarray:
        if norm.gather:
            x = x[..., self.const(self.g.node_by_name[norm.gather].input[1])]
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + 1e-5) * self.const(norm.weight)
        return (y + self.const(norm.bias) if norm.bias else y).astype(np.float32)

    def q(self, tag: str, x: np.ndarray) -> np.ndarray:
        if tag not in self.qdq:
            return x
        if tag in self.row_max:
            top = x.max(-1, keepdims=True)
            return self.qdq[tag](x / top) * top
        y = self.qdq[tag](x)
        if tag in self.keep_first:  # [B, S, C] or [B·S, C]: the first token of each sequence as it was
            y = y.reshape(-1, self.seq, x.shape[-1]).copy()
            y[:, 0] = x.reshape(-1, self.seq, x.shape[-1])[:, 0]
            y = y.reshape(x.shape)
        return y

    def forward(self, x: np.ndarray, scaling: float) -> np.ndarray:
        """Layer output for input ``x`` [B, S, C] (causal attention, no padding, no past)."""
        L = self.layer
        b, s, c = x.shape
        self.seq = s
        h, d = L.num_heads, L.head_dim
        a = self.q("attn_ln", self.norm(x, L.attn_norm))
        q = self.q("q", self.linear(a, L.q_proj)) * np.float32(scaling)
        k = self.q("k", self.linear(a, L.k_proj))
        v = self.q("v", self.linear(a, L.v_proj))
        heads = lambda t: t.reshape(b, s, h, d).transpose(0, 2, 1, 3)  # noqa: E731
        scores = heads(q) @ heads(k).transpose(0, 1, 3, 2)
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, np.finfo(np.float32).min)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = self.q("P", (p / p.sum(-1, keepdims=True)).astype(np.float32))
        o = self.q("out_in", (p @ heads(v)).transpose(0, 2, 1, 3).reshape(b, s, c))
        x = x + self.linear(o, L.out_proj)
        flat = x.reshape(-1, c)
        f = self.q("ffn_ln", self.norm(flat, L.final_norm))
        r = self.q("fc2_in", np.maximum(self.linear(f, L.fc1), 0))
        return (flat + self.linear(r, L.fc2)).reshape(b, s, c).astype(np.float32)

    def layer_output(self) -> str:
        """The graph tensor holding this layer's output (the residual Add after fc2)."""
        return next(n.output[0] for n in self.g.consumers[self.layer.fc2.output] if n.op_type == "Add")
