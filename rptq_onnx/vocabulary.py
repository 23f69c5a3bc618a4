"""The words rptq-onnx's modules share: reorder points, taps, the names of what it adds to a graph, and
the containers n-bit codes are stored in. Defined here once; every other module imports them.

No imports on purpose: the command line reads this module before any heavy import.
"""

# --- reorder points (README "Reorder points"; anatomy's DecoderLayer.points() names their tensors) ---

POINTS = ("R1", "R2", "R3", "R4", "R5")

# --- taps: the per-layer tensors calibration observes (passes/insert_taps.py) ---

# tap → (the R-point whose cluster plan it uses, a label). q_attn / k_attn are the QKᵀ inputs R2 is
# clustered on (for Llama the same tensors as q / k); the softmax output P has no R-point (fixed 1/255 scale).
TAP_POINTS = {
    "attn_ln": ("R1", "attn-norm out"),
    "q_attn": ("R2", "q at QKᵀ"), "k_attn": ("R2", "k at QKᵀ"),
    "q": ("R2", "q"), "k": ("R2", "k (K cache)"),
    "v": ("R3", "v (V cache)"), "out_in": ("R3", "out_proj in"),
    "ffn_ln": ("R4", "ffn-norm out"),
    "fc2_in": ("R5", "fc2 / down_proj in"),
}
TAPS = tuple(TAP_POINTS)  # in graph order; OPT taps all nine, Llama seven (q/k are the QKᵀ inputs)
TAP_POINT = {tap: point for tap, (point, _) in TAP_POINTS.items()}
# taps over query-head channels: the K/V-head plan applied to every query head of a group (GQA)
QUERY_HEAD_TAPS = {"q", "out_in"}
# tap → the linears reading it (GPTQ's Hessian Xᵀ·X is taken there), and linear → the tap of its input
HESSIAN_TAPS = {"attn_ln": ("q_proj", "k_proj", "v_proj"), "out_in": ("out_proj",), "ffn_ln": ("fc1", "up_proj"),
                "fc2_in": ("fc2",)}
LINEAR_INPUT_TAP = {linear: tap for tap, linears in HESSIAN_TAPS.items() for linear in linears}
MLP_LINEARS = HESSIAN_TAPS["ffn_ln"] + HESSIAN_TAPS["fc2_in"]  # fc1 (Llama: gate_proj), up_proj, fc2 (down_proj)
# point → (the tap whose per-channel (max, min) `rptq-onnx ranges` plots, what it is)
POINT_TAPS = {"R1": ("attn_ln", "attention-norm output"), "R2": ("k_attn", "K (as at QKᵀ)"),
              "R3": ("out_in", "out_proj / o_proj input (V channels)"),
              "R4": ("ffn_ln", "FFN-norm output (OPT final LN, Llama post-attention norm)"),
              "R5": ("fc2_in", "fc2 / down_proj input")}


def tap_label(tap: str) -> str:
    """'R2 q', 'R3 out_proj in', …, for tables and plots."""
    if tap == "P":
        return "softmax P"
    point, what = TAP_POINTS[tap]
    return f"{point} {what}"


# the activation Q/DQ points (rptq.qdq.L{i}.{tap}) in table order, with their labels
QDQ_LABELS = {tap: tap_label(tap) for tap in ("attn_ln", "q", "k", "v", "out_in", "ffn_ln", "fc2_in", "P")}

# --- names: every node, tensor and initializer rptq-onnx adds starts with one of these prefixes ---

RPTQ_PREFIX = "rptq."  # any of the below
TAP_PREFIX = "rptq.tap."  # calibration taps: rptq.tap.L{i}.{tap}.{max|min|xtx}
QDQ_PREFIX = "rptq.qdq."  # activation Q/DQ: rptq.qdq.L{i}.{tap}.{quantize|clip|dq|…}
LAYOUT_PREFIX = "rptq.layout."  # the head-layout reshapes around a Q/DQ (an identity once Q/DQ is bypassed)
REORDER_PREFIX = "rptq.reorder."  # Gathers and RoPE-table permutations of fold_reorder
WEIGHT_PREFIX = "rptq.w."  # low-bit weights: rptq.w.{linear node}.…
BLOCK_SUMS_PREFIX = WEIGHT_PREFIX + "block_sums."  # a kept source grid's block sums (or means) of a linear input, shared
OFFSET_ADD_SUFFIX = ".add_offset"  # …and the Add of its per-block offset term after the MatMulNBits
WITH_BLOCK_SUMS_PREFIX = WEIGHT_PREFIX + "with_block_sums."  # …or the Concat [x, block means …] read by the kernel
KV_PREFIX = "rptq.kv."  # the low-bit KV cache's store and load
ATTENTION_PREFIX = "rptq.attn."  # fused GroupQueryAttention and what feeds it
HEAD_PREFIX = "rptq.head."  # the low-bit LM head
EMBEDDING_PREFIX = "rptq.embedding."  # the low-bit token embedding

# metadata_props keys stamped into a compiled model
CONFIG_KEY = "rptq.config"  # the CompileConfig as JSON
VERSION_KEY = "rptq.version"
CLUSTERS_KEY = "rptq.clusters"  # the file name of the cluster plans beside the model

# --- containers: what n-bit codes are stored in ---
#
# 3-bit codes sit in different containers on purpose:
# - weights and the K/V cache: uint4 (the 4-bit MatMulNBits / GroupQueryAttention kernels). Their
#   codes are already on the 3-bit grid (computed offline, or fake-quantized before the cache's
#   QuantizeLinear with the same scales), so 0..7 is all a uint4 ever holds.
# - activation Q/DQ: uint8 with a Clip(0, 7) between Q and DQ. QuantizeLinear rounds at run time and
#   saturates only at its container's limits, so a grid narrower than its container needs a Clip,
#   and ONNX's Clip takes no 4-bit types.
# - the memory table counts what is stored: 3-bit codes cost 4 bits.

UINT8, UINT4 = 2, 21  # onnx.TensorProto.UINT8 / UINT4 (fixed by the ONNX standard; no onnx import here)


def storage_bits(bits: int) -> int:
    """Weights and the K/V cache: codes of up to 4 bits in 4-bit storage (uint4, the 4-bit kernels), else 8."""
    return 4 if bits <= 4 else 8


def uint_container(bits: int) -> int:
    """The ONNX element type of ``bits``-bit weight or cache codes: uint4 or uint8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"low-bit codes need 2..8 bits, got {bits}")
    return UINT4 if storage_bits(bits) == 4 else UINT8


def activation_container(bits: int) -> tuple[int, bool]:
    """(ONNX element type, needs Clip) of an n-bit activation Q/DQ: uint8 and uint4 exactly, else uint8 + Clip."""
    if bits == 8:
        return UINT8, False
    if bits == 4:
        return UINT4, False
    if 2 <= bits < 8:
        return UINT8, True
    raise ValueError(f"unsupported activation bit width {bits}")


def stored_bits(bits: int) -> int:
    """Bits the memory table counts per n-bit code (16: float16): 3-bit codes take 4-bit containers."""
    return bits if bits >= 16 else storage_bits(bits)
