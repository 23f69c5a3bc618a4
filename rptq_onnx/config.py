"""Compile configuration: frozen dataclasses with a JSON round trip (stamped into outputs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from rptq_onnx.errors import RptqError
from rptq_onnx.vocabulary import POINTS

# preset → (weight bits, activation bits, only K/V activations quantized)
PRESETS = {
    "reorder": (16, 16, False),
    "W16A16": (16, 16, False),
    "W8A8": (8, 8, False),
    "W4A16": (4, 16, False),
    "W4A8": (4, 8, False),
    "W4A4": (4, 4, False),
    "W4A4KV": (4, 4, True),
    "W4A3KV": (4, 3, True),
    "W3A3KV": (3, 3, True),
}
WBITS = (3, 4, 8, 16)
ABITS = (3, 4, 5, 6, 7, 8, 16)
WEIGHT_QUANT = ("gptq", "rtn")
OBSERVERS = ("ema", "minmax", "mean", "mse", "auto")  # rptq_onnx/observers.py (auto: by the point's bits)
LAYOUTS = ("zero-copy", "contiguous")
SOURCE_GRID = ("keep", "keep-mlp", "requantize")
KEEPS_GRID = ("keep", "keep-mlp")  # the values under which weights on a grid keep it (all, or the MLP's)
GRID_OFFSETS = ("term", "blocks")  # how kept codes carry a float offset per block (passes/quantize_weights.py)
SOFTMAX_SCALES = ("row", "fixed")  # the softmax output P: step max(row)/255, or 1/255 (the reference)
# the first token of each sequence (the attention sink) at the norm outputs and the out_proj/down_proj inputs:
# kept in float, or quantized like every other token (the reference); passes/emit_qdq.py (keep_first)
FIRST_TOKENS = ("float", "quantized")
RECIPES = ("default", "paper")  # rptq_onnx/recipes.py
# fused: one com.microsoft:GroupQueryAttention per layer over the (low-bit) cache; auto: fused for the KV
# presets on graphs with a cache, else eager (compile.resolve_attention)
ATTENTION = ("eager", "fused", "auto")
PROPAGATION = ("float", "quantized")  # rptq_onnx/compile_layerwise.py
# A point's cluster spec: a KMeans cluster count (≥ 1), one cluster per channel, or one scale for the whole
# tensor, across heads too. Written as such into report.json and the stamped config.
PER_CHANNEL = "ch"  # --clusters R1=ch
PER_TENSOR = "tensor"  # --clusters all=tensor
ClusterSpec = int | Literal["ch", "tensor"]
_OLD_SPECS = {0: PER_CHANNEL, -1: PER_TENSOR}  # how outputs of rptq-onnx 0.1.0 wrote them


MIN_GROUP = 16  # weight groups: MatMulNBits' smallest block
HEAD_BITS = (4, 8, 16)  # the token embedding and LM head (16: float)

@dataclass(frozen=True)
class ClusterCounts:
    """Cluster spec per reorder point (R2/R3 are per head): a count, ``"ch"`` or ``"tensor"``. Reference defaults."""

    R1: ClusterSpec = 32
    R2: ClusterSpec = 4
    R3: ClusterSpec = 4
    R4: ClusterSpec = 32
    R5: ClusterSpec = 32

    def __post_init__(self):
        for point, k in self.as_dict().items():
            if k not in (PER_CHANNEL, PER_TENSOR) and not (type(k) is int and k >= 1):
                raise RptqError(f"clusters {point}={k!r}: use a cluster count ≥ 1, 'ch' or 'tensor'")

    @classmethod
    def parse(cls, text: str | None) -> ClusterCounts:
        """``"R1=32,R2=4"`` (unnamed points keep their defaults); ``"all=1"`` sets every point;
        ``ch`` means one cluster per channel (``all=ch``: the per-channel baseline) and ``tensor`` one
        scale per tensor (``all=tensor``: the per-tensor baseline; ``1`` is one per head at R2/R3)."""
        if not text:
            return cls()
        values: dict[str, ClusterSpec] = {}
        named: set[str] = set()
        for item in text.split(","):
            key, sep, raw = item.strip().partition("=")
            key = key.strip()
            if not sep or key not in (*POINTS, "all"):
                raise RptqError(f"--clusters: '{item.strip()}' is not POINT=K; use keys {', '.join(POINTS)} or all, e.g. R1=32,R2=4")
            if raw.strip() in ("ch", "channel", "per-channel"):
                k = PER_CHANNEL
            elif raw.strip() in ("tensor", "per-tensor"):
                k = PER_TENSOR
            else:
                try:
                    k = int(raw)
                except ValueError:
                    raise RptqError(f"--clusters: {key}={raw.strip()} is not an integer cluster count (or 'ch' for "
                                    "per-channel, 'tensor' for per-tensor)") from None
                if k < 1:
                    raise RptqError(f"--clusters: {key}={k}; a cluster count must be at least 1 (or 'ch', 'tensor')")
            if key in named or (key == "all" and named):  # a point given twice, or all= after a point
                raise RptqError(f"--clusters {text}: {key}= sets a point already set; name each point once, all= first")
            named.add(key)
            if key == "all":
                values.update({p: k for p in POINTS})
            else:
                values[key] = k
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict) -> ClusterCounts:
        """As written by ``as_dict``; also the 0 (per channel) / −1 (per tensor) of older outputs."""
        return cls(**{p: _OLD_SPECS.get(k, k) if type(k) is int else k for p, k in d.items()})

    def as_dict(self) -> dict[str, ClusterSpec]:
        return dataclasses.asdict(self)

    def kmeans_k(self) -> dict[str, int | None]:
        """KMeans k per point: the count; None for one cluster per channel; 1 for a per-tensor point
        (one cluster per head, channels kept in order; ``per_tensor_points`` get one scale)."""
        return {p: None if k == PER_CHANNEL else 1 if k == PER_TENSOR else k for p, k in self.as_dict().items()}

    def per_tensor_points(self) -> frozenset[str]:
        return frozenset(p for p, k in self.as_dict().items() if k == PER_TENSOR)

    def __str__(self) -> str:
        return ",".join(f"{p}={k}" for p, k in self.as_dict().items())


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration tokens come from: a text file, or ``"random"`` token ids (smoke runs)."""

    source: str = "random"
    nsamples: int = 32
    seqlen: int | None = None  # None: 512, or the model's positions when fewer
    seed: int = 0
    batch_size: int = 4

    DEFAULT_SEQLEN = 512

    def resolved_seqlen(self, max_positions: int | None) -> int:
        if self.seqlen is not None:
            return self.seqlen
        return min(self.DEFAULT_SEQLEN, max_positions or self.DEFAULT_SEQLEN)

    def __post_init__(self):
        if self.nsamples < 1:
            raise RptqError(f"--nsamples {self.nsamples}: need at least one calibration window")
        if self.seqlen is not None and self.seqlen < 2:
            raise RptqError(f"--seqlen {self.seqlen}: a calibration window needs at least 2 tokens")
        if self.batch_size < 1:
            raise RptqError(f"--batch-size {self.batch_size}: must be at least 1")


@dataclass(frozen=True)
class QuantSpec:
    """What gets quantized and how. 16 bits means "left in float"."""

    wbits: int = 16
    abits: int = 16
    kv_only: bool = False
    weight_quant: str = "gptq"
    group_size: int | None = None  # None: per output channel
    observer: str = "auto"  # activation ranges (OBSERVERS; rptq_onnx/observers.py); the reference: ema
    matmulnbits: bool = True  # 3/4-bit weights as com.microsoft MatMulNBits (packed in memory) when possible
    float_cache: bool = False  # with-past graphs: keep present/past in float (K/V still fake-quantized)
    head_bits: int = 16  # token embedding + LM head (passes/quantize_head.py); 16: float
    source_grid: str = "keep"  # weights already on a wbits grid keep their codes (rptq_onnx/source_grid.py)
    accuracy_level: int = 0  # 4-bit MatMulNBits: 0 = float GEMM on the exact codes; 4 = int8 inputs, integer GEMM
    grid_offset: str = "term"  # GRID_OFFSETS: a kept Q4_1 grid's float minimum as an offset term, or inside the kernel
    softmax_scale: str = "row"  # SOFTMAX_SCALES; passes/emit_qdq.py (row_max)
    first_token: str = "float"  # FIRST_TOKENS; passes/emit_qdq.py (keep_first), passes/insert_taps.py (skip_first)

    def __post_init__(self):
        if self.wbits not in WBITS:
            raise RptqError(f"--wbits {self.wbits} is not supported; use one of {', '.join(map(str, WBITS))}")
        if self.abits not in ABITS:
            raise RptqError(f"--abits {self.abits} is not supported; use 3..8 or 16")
        if self.weight_quant not in WEIGHT_QUANT:
            raise RptqError(f"--weight-quant {self.weight_quant} is unknown; use gptq or rtn")
        if self.observer not in OBSERVERS:
            raise RptqError(f"--observer {self.observer} is unknown; use {', '.join(OBSERVERS)}")
        if self.accuracy_level not in (0, 4):
            raise RptqError(f"--accuracy-level {self.accuracy_level}: use 4 (int8 inputs) or 0 (float)")
        if self.softmax_scale not in SOFTMAX_SCALES:
            raise RptqError(f"--softmax-scale {self.softmax_scale} is unknown; use {' or '.join(SOFTMAX_SCALES)}")
        if self.first_token not in FIRST_TOKENS:
            raise RptqError(f"--first-token {self.first_token} is unknown; use {' or '.join(FIRST_TOKENS)}")
        if self.source_grid not in SOURCE_GRID:
            raise RptqError(f"--source-grid {self.source_grid} is unknown; use {', '.join(SOURCE_GRID)}")
        if self.grid_offset not in GRID_OFFSETS:
            raise RptqError(f"--grid-offset {self.grid_offset} is unknown; use {' or '.join(GRID_OFFSETS)}")
        if self.head_bits not in HEAD_BITS:
            raise RptqError(f"--head-bits {self.head_bits} is not supported; use 4, 8 or 16 (float)")
        if self.group_size is not None and (self.group_size < MIN_GROUP or self.group_size & (self.group_size - 1)):
            raise RptqError(f"--group-size {self.group_size}: use a power of two ≥ {MIN_GROUP} (MatMulNBits' "
                            "smallest block), or 0 for per-channel")

    @property
    def ln_bits(self) -> int:
        """LayerNorm outputs and the softmax output: max(8, abits), as the reference."""
        return max(8, self.abits)

    @property
    def quantizes_activations(self) -> bool:
        return self.abits < 16

    @property
    def quantizes_weights(self) -> bool:
        return self.wbits < 16

    @classmethod
    def for_preset(cls, preset: str, wbits: int | None = None, abits: int | None = None, kv_only: bool | None = None,
                   **kwargs) -> QuantSpec:
        if preset not in PRESETS:
            raise RptqError(f"--preset {preset} is not available; choose one of {', '.join(PRESETS)}")
        pw, pa, pkv = PRESETS[preset]
        w = pw if wbits is None else wbits
        a = pa if abits is None else abits
        if "group_size" not in kwargs or kwargs["group_size"] is None:
            # MatMulNBits needs block quantization: weight-only 4-bit defaults to groups of 128
            kwargs["group_size"] = 128 if (w == 4 and a == 16) else None
        elif kwargs["group_size"] == 0:
            kwargs["group_size"] = None
        if kwargs.get("head_bits") is None:
            # the vocabulary table at 8 bits costs no measurable perplexity (README, *Low-bit weights in memory*)
            kwargs["head_bits"] = 8 if w < 16 and kwargs.get("matmulnbits", True) else 16
        return cls(wbits=w, abits=a, kv_only=pkv if kv_only is None else kv_only, **kwargs)


@dataclass(frozen=True)
class CompileConfig:
    preset: str = "reorder"
    clusters: ClusterCounts = field(default_factory=ClusterCounts)
    calib: CalibConfig = field(default_factory=CalibConfig)
    layout: str = "zero-copy"
    quant: QuantSpec = field(default_factory=QuantSpec)
    attention: str = "eager"
    recipe: str = "default"  # rptq_onnx/recipes.py
    propagate: str = "float"  # layer-wise compile: the next layer calibrates on the float or the quantized stream
    # no --clusters given: the recipe may choose other counts once attention is resolved (recipes.resolve_clusters)
    recipe_clusters: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise RptqError(f"--preset {self.preset} is not available; choose one of {', '.join(PRESETS)}")
        if self.layout not in LAYOUTS:
            raise RptqError(f"--layout {self.layout} is unknown; choose one of {', '.join(LAYOUTS)}")
        if self.recipe not in RECIPES:
            raise RptqError(f"--recipe {self.recipe} is unknown; use {' or '.join(RECIPES)}")
        if self.propagate not in PROPAGATION:
            raise RptqError(f"--propagate {self.propagate} is unknown; use {' or '.join(PROPAGATION)}")
        if self.attention not in ATTENTION:
            raise RptqError(f"--attention {self.attention} is unknown; choose one of {', '.join(ATTENTION)}")
        q = self.quant
        if self.attention == "fused" and q.quantizes_activations and not q.kv_only:
            raise RptqError(f"--attention fused cannot apply to {self.name}: it quantizes the softmax output P, which "
                            "GroupQueryAttention cannot; use a KV preset (W4A4KV, …) or --attention eager")

    @property
    def fused_cache_bits(self) -> int | None:
        """With fused attention: the K/V bit width of the kernel's low-bit cache, or None (float cache)."""
        q = self.quant
        return q.abits if (self.attention == "fused" and q.quantizes_activations and not q.float_cache) else None

    @property
    def name(self) -> str:
        """W{w}A{a}[KV] as the paper names configurations."""
        q = self.quant
        return f"W{q.wbits}A{q.abits}" + ("KV" if q.kv_only and q.abits < 16 else "")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompileConfig:
        d = json.loads(text)
        return cls(preset=d["preset"], clusters=ClusterCounts.from_dict(d["clusters"]), calib=CalibConfig(**d["calib"]),
                   layout=d["layout"], quant=QuantSpec(**d.get("quant", {})), attention=d.get("attention", "eager"),
                   recipe=d.get("recipe", "default"), propagate=d.get("propagate", "float"),
                   recipe_clusters=d.get("recipe_clusters", False))
