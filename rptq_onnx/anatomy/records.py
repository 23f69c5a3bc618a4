"""The layer map's records: what a pass needs to know about each decoder layer, its linears, norms and RoPE."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Norm:
    """A normalization: its input (the residual stream), output, γ (and β) initializers.

    ``kind`` is ``layernorm`` (one LayerNormalization node) or ``rmsnorm`` (decomposed; ``node``
    is the final Mul by γ). ``data_input`` / ``weight_input`` are the slots of ``node`` that
    carry the data and γ. In a graph compiled with the contiguous layout, ``input`` is still the
    residual stream and ``gather`` names the reorder Gather feeding ``node``'s data slot.
    """

    node: str
    input: str
    output: str
    weight: str
    bias: str | None
    channels: int
    gather: str | None = None
    kind: str = "layernorm"
    data_input: int = 0
    weight_input: int = 1


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one [B, heads, S, head_dim] tensor: x·cos + rotate_half(x)·sin.

    ``cos_mul`` / ``sin_mul`` are the two Mul nodes and ``cos_input`` / ``sin_input`` the slots
    holding the (broadcast [B, 1, S, D]) tables, which a reorder of the head channels must follow.
    """

    input: str
    output: str
    cos_mul: str
    cos_input: int
    sin_mul: str
    sin_input: int


@dataclass(frozen=True)
class Linear:
    """A linear layer: MatMul [in, out] (+ Add bias) or Gemm (transB=1: [out, in]).

    In a compiled graph ``weight`` may be low-bit: ``weight_dq`` then names the
    DequantizeLinear that feeds the MatMul/Gemm (``weight`` is its integer initializer), or
    ``op`` is ``MatMulNBits`` (``weight`` the packed blocks, layout "nbits").
    """

    node: str
    op: str
    input: str
    output: str  # after the bias
    weight: str  # initializer name (Identity chains resolved)
    weight_layout: str  # "in_out" (MatMul, Gemm transB=0) or "out_in" (Gemm transB=1)
    bias: str | None
    bias_node: str | None  # the Add of a MatMul's bias; None for Gemm (bias is input C)
    in_features: int
    out_features: int
    weight_dq: str | None = None


@dataclass(frozen=True)
class DecoderLayer:
    """Everything an RPTQ pass needs to know about one decoder layer (OPT or Llama).

    Llama's linears map onto the OPT roles: o_proj is ``out_proj``, gate_proj ``fc1``,
    down_proj ``fc2``, and ``up_proj`` is set (None for OPT). ``num_kv_heads`` < ``num_heads``
    is grouped-query attention: K/V head g serves query heads g·r … g·r + r − 1 (r = the ratio).
    """

    index: int
    num_heads: int
    head_dim: int
    hidden_size: int
    ffn_dim: int
    attn_norm: Norm
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    qk_matmul: str
    softmax: str
    softmax_output: str
    pv_matmul: str
    out_proj: Linear
    final_norm: Norm  # the norm before the FFN (R4): OPT final_layer_norm, Llama post_attention_layernorm
    fc1: Linear
    activation: str  # the node whose output is R5 (OPT: the ReLU; Llama: the SwiGLU product)
    fc2: Linear
    attn_output: str  # R3: the out_proj input before any Q/DQ (heads merged, channels of v)
    mlp_hidden: str  # R5: the fc2 input before any Q/DQ (after the activation)
    query: str  # R2 q as quantized: OPT q_proj output [B, S, C]; Llama q after RoPE [B, H, S, D]
    key: str  # R2 k as quantized and cached: OPT k_proj output; Llama k after RoPE [B, H_kv, S, D]
    family: str = "opt"
    num_kv_heads: int = 0  # 0: as num_heads
    up_proj: Linear | None = None
    q_rope: Rope | None = None
    k_rope: Rope | None = None
    past_key: str | None = None
    past_value: str | None = None
    present_key: str | None = None
    present_value: str | None = None

    def __post_init__(self):
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)

    @property
    def value(self) -> str:
        """V as quantized and cached: the v_proj output, [B, S, kv_heads·head_dim]."""
        return self.v_proj.output

    @property
    def group(self) -> int:
        """Query heads per K/V head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def qk_layout(self) -> str:
        """Layout of the R2 tensors: ``bsc`` [B, S, H·D] (OPT) or ``bhsd`` [B, H, S, D] (after RoPE)."""
        return "bhsd" if self.q_rope is not None else "bsc"

    def linears(self) -> dict[str, Linear]:
        """Role → linear, in graph order (``up_proj`` only for gated MLPs)."""
        roles = {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "out_proj": self.out_proj,
                 "fc1": self.fc1}
        if self.up_proj is not None:
            roles["up_proj"] = self.up_proj
        roles["fc2"] = self.fc2
        return roles

    def points(self) -> dict[str, tuple[str, ...]]:
        """R-point → the tensor(s) whose channels are clustered there."""
        return {
            "R1": (self.attn_norm.output,),
            "R2": (self.query, self.key),
            "R3": (self.attn_output,),
            "R4": (self.final_norm.output,),
            "R5": (self.mlp_hidden,),
        }

    def point_channels(self) -> dict[str, int]:
        """Channels each point's cluster plan covers (R2 / R3: the K / V channels, per K/V head)."""
        kv = self.num_kv_heads * self.head_dim
        return {"R1": self.hidden_size, "R2": kv, "R3": kv, "R4": self.hidden_size, "R5": self.ffn_dim}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["points"] = {k: list(v) for k, v in self.points().items()}
        d["point_channels"] = self.point_channels()
        return d


@dataclass(frozen=True)
class ModelMap:
    """The layer map plus model-level facts passes need (final norm, LM head, sharing)."""

    layers: tuple[DecoderLayer, ...]
    with_past: bool
    shared_initializers: frozenset[str]
    shape_inference_error: str | None = None  # why ONNX shape inference failed (the declared shapes were used)

    def is_shared(self, initializer: str) -> bool:
        """True when more than one node reads this initializer: copy it before modifying."""
        return initializer in self.shared_initializers
