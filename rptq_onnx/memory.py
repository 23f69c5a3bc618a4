"""Memory of an OPT or Llama model at each preset: weights, activations and KV cache (`rptq-onnx memory`).

The formula, per preset with weight bits w, activation bits a and cache bits kv (= a for every
preset that quantizes K/V, else 16; FP16 is the unquantized baseline):

    weights      = linear parameters × stored(w)/8
                 + 2 × 2 bytes per output channel of each linear (fp16 scale and zero point, if w < 16)
                 + other parameters (embeddings, positions, LayerNorms, biases) × 2 bytes (fp16)
    KV cache     = 2 (K and V) × layers × batch × seqlen × hidden × stored(kv)/8
                   (Llama: kv_heads × head_dim instead of hidden — grouped-query attention caches fewer heads)
    activations  = batch × seqlen × ffn_dim × a/8
                   (the largest tensor one layer holds at a time: the fc1 output; attention
                   probabilities are left out, as a fused/flash attention kernel never stores them)

stored(n) is what rptq-onnx stores n-bit codes in: 3-bit codes take 4-bit containers (uint4, the
4-bit MatMulNBits and cache kernels), so W3 and 3-bit caches cost what 4 bits cost (the paper counts
3 bits). This is the same breakdown as the RPTQ paper's memory table. It is arithmetic on the published
shapes, not a measurement; for a compiled model ``rptq-onnx inspect`` shows the measured
initializer bytes by dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from rptq_onnx.config import PRESETS
from rptq_onnx.errors import RptqError
from rptq_onnx.vocabulary import stored_bits


@dataclass(frozen=True)
class OptShape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int = 50272
    positions: int = 2048

    kv_label = "hidden"

    @property
    def kv_channels(self) -> int:
        """Cached channels per token per layer, for K and for V."""
        return self.hidden

    @property
    def linear_params(self) -> int:
        return self.layers * (4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn)

    @property
    def linear_out_channels(self) -> int:
        return self.layers * (4 * self.hidden + self.ffn + self.hidden)

    @property
    def other_params(self) -> int:
        """Embeddings (tied LM head), learned positions (+2 offset), LayerNorms, biases."""
        per_layer = 2 * 2 * self.hidden + 4 * self.hidden + self.ffn + self.hidden
        return self.vocab * self.hidden + (self.positions + 2) * self.hidden + self.layers * per_layer + 2 * self.hidden


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-family shape: grouped-query attention, SwiGLU MLP (3 linears), RMSNorm, RoPE (no positions)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    kv_heads: int
    head_dim: int
    vocab: int = 32000
    positions: int = 2048
    tied: bool = True

    kv_label = "kv_heads × head_dim"

    @property
    def kv_channels(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        q = self.heads * self.head_dim
        return self.layers * (2 * self.hidden * q + 2 * self.hidden * self.kv_channels + 3 * self.hidden * self.ffn)

    @property
    def linear_out_channels(self) -> int:
        return self.layers * (self.heads * self.head_dim + 2 * self.kv_channels + self.hidden + 2 * self.ffn + self.hidden)

    @property
    def other_params(self) -> int:
        """Embeddings (and an untied LM head), two RMSNorms per layer and the final one."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


# The published OPT shapes (Zhang et al. 2022, Table 1).
OPT_CONFIGS = {
    "opt-125m": OptShape(12, 768, 12, 3072),
    "opt-350m": OptShape(24, 1024, 16, 4096),
    "opt-1.3b": OptShape(24, 2048, 32, 8192),
    "opt-2.7b": OptShape(32, 2560, 32, 10240),
    "opt-6.7b": OptShape(32, 4096, 32, 16384),
    "opt-13b": OptShape(40, 5120, 40, 20480),
    "opt-30b": OptShape(48, 7168, 56, 28672),
    "opt-66b": OptShape(64, 9216, 72, 36864),
    "opt-175b": OptShape(96, 12288, 96, 49152),
}
# Llama-family shapes by name: SmolLM2-135M (the model `smollm2` names), Llama-2-7B, Llama-3-8B.
LLAMA_CONFIGS = {
    "smollm2-135m": LlamaShape(30, 576, 9, 1536, kv_heads=3, head_dim=64, vocab=49152, positions=8192),
    "llama-2-7b": LlamaShape(32, 4096, 32, 11008, kv_heads=32, head_dim=128, vocab=32000, positions=4096, tied=False),
    "llama-3-8b": LlamaShape(32, 4096, 32, 14336, kv_heads=8, head_dim=128, vocab=128256, positions=8192, tied=False),
}
TABLE_PRESETS = ("FP16", "W8A8", "W4A16", "W4A8", "W4A4", "W4A4KV", "W4A3KV", "W3A3KV")


@dataclass(frozen=True)
class Memory:
    preset: str
    wbits: int
    abits: int
    kvbits: int
    weights: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations


def preset_bits(preset: str) -> tuple[int, int, int]:
    """(weight, activation, cache) bits; activations of KV-only presets stay at 16 bits."""
    if preset == "FP16":
        return 16, 16, 16
    if preset not in PRESETS:
        raise RptqError(f"unknown preset {preset}; use FP16 or one of {', '.join(PRESETS)}")
    w, a, kv_only = PRESETS[preset]
    w, a = min(w, 16), min(a, 16)
    return w, (16 if kv_only else a), a


def memory(shape: OptShape | LlamaShape, preset: str, batch: int, seqlen: int) -> Memory:
    if batch < 1 or seqlen < 1:
        raise RptqError(f"--batch {batch} / --seqlen {seqlen}: both must be at least 1")
    w, a, kv = preset_bits(preset)
    weights = shape.linear_params * stored_bits(w) / 8 + shape.other_params * 2
    if w < 16:
        weights += shape.linear_out_channels * 2 * 2
    kv_cache = 2 * shape.layers * batch * seqlen * shape.kv_channels * stored_bits(kv) / 8
    activations = batch * seqlen * shape.ffn * a / 8
    return Memory(preset, w, a, kv, weights, kv_cache, activations)


CONFIG_ALIASES = {"smollm2": "smollm2-135m"}  # the bundled model's name, as export/compile take it


def resolve_shape(name: str) -> OptShape | LlamaShape:
    """A published config name (``opt-66b``, ``llama-3-8b``), or a model directory / .onnx with export.json or config.json."""
    import json
    from pathlib import Path

    from rptq_onnx.artifacts import RECORD_NAME

    key = name.lower().removeprefix("facebook/")
    if key in OPT_CONFIGS:
        return OPT_CONFIGS[key]
    key = CONFIG_ALIASES.get(key, key)
    if key in LLAMA_CONFIGS:
        return LLAMA_CONFIGS[key]
    path = Path(name)
    folder = path.parent if path.suffix == ".onnx" else path
    cfg = None
    if (folder / RECORD_NAME).is_file():
        cfg = json.loads((folder / RECORD_NAME).read_text()).get("config")
    elif (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
    from rptq_onnx.export import FAMILIES

    if cfg and FAMILIES.get(cfg.get("model_type")) == "llama":
        heads = cfg["num_attention_heads"]
        return LlamaShape(cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg["intermediate_size"],
                          kv_heads=cfg.get("num_key_value_heads") or heads,
                          head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                          positions=cfg["max_position_embeddings"], tied=cfg.get("tie_word_embeddings", True))
    if not cfg or cfg.get("model_type") != "opt":
        known = ", ".join([*OPT_CONFIGS, *LLAMA_CONFIGS])
        raise RptqError(f"'{name}' is neither a known config ({known}) nor an OPT / Llama model directory with "
                        "export.json / config.json")
    return OptShape(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["ffn_dim"],
                    cfg["vocab_size"], cfg["max_position_embeddings"])


def gb(n: float) -> str:
    """Decimal units (as the paper): GB, or MB / kB for small models."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def format_memory_table(name: str, shape: OptShape | LlamaShape, batch: int, seqlen: int, presets=TABLE_PRESETS) -> str:
    rows = [memory(shape, p, batch, seqlen) for p in presets]
    lines = [f"{name}: {shape.layers} layers, hidden {shape.hidden}, ffn {shape.ffn}, "
             f"{(shape.linear_params + shape.other_params) / 1e9:.2f} B parameters; batch {batch}, seqlen {seqlen}",
             "",
             "terms: weights = linear params × w/8 + scales/zeros (2 × fp16 per output channel) + other params × 2 B",
             f"       linear params {shape.linear_params:,}, output channels {shape.linear_out_channels:,}, "
             f"other params {shape.other_params:,}",
             f"       KV cache = 2 × layers × batch × seqlen × {shape.kv_label} × kv/8 = 2 × {shape.layers} × {batch} × "
             f"{seqlen} × {shape.kv_channels} × kv/8",
             f"       activations = batch × seqlen × ffn × a/8 = {batch} × {seqlen} × {shape.ffn} × a/8 "
             "(largest per-layer tensor; attention probabilities excluded)",
             "",
             "| preset | w | a | kv | weights | KV cache | activations | total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        lines.append(f"| {m.preset} | {m.wbits} | {m.abits} | {m.kvbits} | {gb(m.weights)} | {gb(m.kv_cache)} | "
                     f"{gb(m.activations)} | {gb(m.total)} |")
    lines.append("")
    lines.append("w / kv = the codes' bits; rptq-onnx stores 3-bit codes in 4-bit containers, so W3 weights and a "
                 "3-bit cache are costed at 4 bits per element (as stored)")
    by = {m.preset: m for m in rows}
    if "W4A16" in by and "W4A4" in by:
        saved = by["W4A16"].total - by["W4A4"].total
        lines += ["", f"W4A4 vs W4A16: {gb(by['W4A4'].total)} vs {gb(by['W4A16'].total)} → saves {gb(saved)}"]
    return "\n".join(lines)
