"""Recipes: named sets of quantization choices, so that a result can be asked for by name.

- ``paper`` — the reference implementation's choices (RPTQ4LLM; parity with it is checked against
  this recipe): EMA min/max ranges, clusters R1=32 R2=4 R3=4 R4=32 R5=32, R2 clustered on the
  (max, min) of q and k (RoPE pairs kept together), softmax output at a fixed 1/255, weights by
  GPTQ per output channel and quantized again even where the source already sits on a grid, a
  float vocabulary table, eager attention (the reference has no fused kernel, and fusing makes
  K symmetric), and each layer calibrated on the quantized outputs of the layers before it
  (``--propagate quantized``, a layer-wise compile).
- ``default`` — rptq-onnx's choices, each measured against ``paper`` on sotu-test and on held-out
  text (README): activation ranges by the point's bits (``--observer auto``: the calibration min/max
  widened by half at 8 bits and more, the mean of the windows' ranges below, the EMA at the KV presets' K/V), one cluster per channel
  at q/K/V and the out_proj input under eager 8-bit attention, 8 per K/V head at q/K and 64 at the
  down_proj/fc2 input under eager 4-bit attention (``EAGER_CLUSTERS``), the softmax output quantized per
  row relative to the row's largest probability (``--softmax-scale row``), the first token of each sequence
  (the attention sink, whose massive activations would widen every range) left in float at the norm outputs
  and the out_proj/down_proj inputs and out of their ranges (``--first-token float``), weights that sit on a grid keep it
  (``--source-grid keep``), weight-only 4-bit in groups of 128, an 8-bit vocabulary table wherever
  weights are quantized, and under fused attention (the KV presets' default) a symmetric K
  clustered freely on its amplitude, with more K and fewer V clusters (``FUSED_KV_CLUSTERS``).

Where ``paper`` still differs from the reference (README, *Quality on the demo model*): R2's q
features are taken after the 1/√d scaling, and weight scales are per output row rather than per (row ×
input cluster).
"""

from __future__ import annotations

import dataclasses

from rptq_onnx.config import RECIPES, ClusterCounts
from rptq_onnx.errors import RptqError
from rptq_onnx.observers import observer_for, searched

# flag → (its value under the paper recipe, how the CLI spells that value)
PAPER_FLAGS = {
    "observer": ("ema", "ema"),
    "clusters": (None, "R1=32,R2=4,R3=4,R4=32,R5=32"),
    "weight_quant": ("gptq", "gptq"),
    "group_size": (0, "0 (per output channel)"),
    "source_grid": ("requantize", "requantize"),
    "head_bits": (16, "16"),
    "attention": ("eager", "eager"),
    "propagate": ("quantized", "quantized"),
    "softmax_scale": ("fixed", "fixed"),
    "first_token": ("quantized", "quantized"),
}
# the defaults of those flags under the default recipe (None: the preset decides)
DEFAULT_FLAGS = {"observer": "auto", "clusters": None, "weight_quant": "gptq", "group_size": None,
                 "source_grid": "keep", "head_bits": None, "attention": "auto", "propagate": "float",
                 "softmax_scale": "row", "first_token": "float"}


# The default recipe's clusters per K/V head for fused attention's low-bit cache (symmetric K clustered on
# its amplitude, asymmetric V), by K/V bits, where no --clusters is given. The cache keeps a scale per
# channel whatever the clusters, so they cost nothing at run time; they only set how ranges are shared.
# Measured on SmolLM2 (first 16,384 tokens; sotu-test / held-out python-docs, FP 23.93 / 16.22; EMA
# ranges unless said): at 4 bits the reference's 4/4 gave 25.03 / 17.49, R2=8,R3=2 24.84 / 17.20 (auto
# ranges 24.88 / 17.35), per channel with auto ranges 25.16 / 17.42; at 3 bits 4/4 gave 38.38 / 26.60,
# R2=8,R3=8 34.47 / 24.42, per channel 30.93 / 22.41 (auto ranges 30.82 / 22.60). README.
FUSED_KV_CLUSTERS = {4: {"R2": 8, "R3": 2}, 3: {"R2": "ch", "R3": "ch"}}
# …and under eager attention, by activation bits: at 8 bits one cluster per channel (per RoPE pair for Llama's
# R2) at q/K/V and the out_proj input. SmolLM2 W16A8, first 16,384 tokens, sotu-test / python-docs: 4/4 per
# K/V head 24.29 / 16.83, 8/8 24.25 / 16.76, per channel 24.20 / 16.80. At 4 bits, 8 clusters per K/V head at
# R2 and 64 at the down_proj/fc2 input (R5). SmolLM2 W16A4 (first token in float), same protocol: the
# reference's counts 43.39 / 32.69, R2=8 42.56 / 31.72, R5=64 42.34 / 31.91 (R5=128 42.48 / 32.60, one per
# channel 45.11 / 39.82), R2=8,R5=64 40.35 / 31.95 (R3=8 on top 40.67 / 32.09); the demo's W4A4 204.281 →
# 204.282 on the main job's tokens, 246.35 → 246.54 on its whole test text. README.
EAGER_CLUSTERS = {8: {"R2": "ch", "R3": "ch"}, 4: {"R2": 8, "R5": 64}}


def resolve_clusters(config):
    """``config`` with the recipe's cluster counts where the user gave none (``recipe_clusters``), by the
    attention, already resolved, and the activation bits."""
    table = FUSED_KV_CLUSTERS if config.attention == "fused" else EAGER_CLUSTERS
    chosen = table.get(config.quant.abits)
    if not (config.recipe_clusters and config.recipe == "default" and chosen):
        return config
    return dataclasses.replace(config, clusters=dataclasses.replace(config.clusters, **chosen))


RANGE_WORDS = {"ema": "EMA min/max", "minmax": "min/max", "mean": "mean of per-window min/max"}


def recipe_flags(recipe: str, given: dict[str, object]) -> dict[str, object]:
    """The value of each recipe-governed flag (``given``: flag → value, None where not given).

    Under ``paper`` a flag given with another value than the recipe's is refused in one line."""
    if recipe not in RECIPES:
        raise RptqError(f"--recipe {recipe} is unknown; use {' or '.join(RECIPES)}")
    if recipe == "default":
        return {k: DEFAULT_FLAGS[k] if given.get(k) is None else given[k] for k in DEFAULT_FLAGS}
    out = {}
    for flag, (value, spelled) in PAPER_FLAGS.items():
        asked = given.get(flag)
        if asked is not None and asked != value and not (flag == "clusters" and _reference_clusters(asked)):
            cli = "--" + flag.replace("_", "-")
            raise RptqError(f"--recipe paper fixes {cli} {spelled}; drop {cli} {asked}, or use --recipe default")
        out[flag] = value
    return out


def _range_words(observer: str, bits: int, kv_cache: bool = False) -> str:
    name, factor = observer_for(observer, bits, kv_cache)
    words = RANGE_WORDS[name] + (f" widened {factor:g}×" if factor != 1 else "")
    if searched(observer):
        words += ", each cluster's clipping searched (least squared error on sampled calibration tokens)"
    return words


def _reference_clusters(text) -> bool:
    return ClusterCounts.parse(str(text)) == ClusterCounts()


def point_choices(config, rope: bool, amplitude_key: bool, skipped: frozenset[str], keeps_grid: bool) -> dict[str, str]:
    """What the recipe chose at each point, in words (report.json, report.md, ``inspect --error``): ``rope``,
    the layers rotate q/k; ``amplitude_key``, R2 is clustered on K's amplitude; ``skipped``, the points left
    unclustered; ``keeps_grid``, weights on a source grid keep it."""
    q, counts = config.quant, config.clusters.as_dict()
    out = {}
    for point, k in counts.items():
        bits = q.ln_bits if point in ("R1", "R4") else q.abits
        ranges = _range_words(q.observer, bits, kv_cache=q.kv_only and point in ("R2", "R3"))
        per = " per K/V head" if point in ("R2", "R3") else ""
        what = {"ch": "one cluster per channel", "tensor": "one scale per tensor"}.get(k, f"{k} clusters{per}")
        if point in skipped:
            out[point] = "not clustered (nothing quantized there)"
        elif point == "R2" and amplitude_key:
            out[point] = f"{what} on K's amplitude, symmetric K (fused attention), {ranges}"
        elif point == "R2" and rope:
            out[point] = f"{what} on (max, min) of q and k, RoPE pairs together, {ranges}"
        else:
            out[point] = f"{what} on (max, min), {ranges}"
    if q.quantizes_activations and not q.kv_only:
        out["P"] = ("softmax output at a fixed scale 1/255" if q.softmax_scale == "fixed" else
                    "softmax output at each row's maximum / 255 (exp(s − max) at 1/255, normalized after)")
    if q.quantizes_activations and not q.kv_only:
        out["first token"] = ("kept in float at the norm outputs and the out_proj/down_proj inputs, and left out of "
                              "their ranges" if q.first_token == "float" else "quantized like every other token")
    if q.quantizes_weights:
        group = f"groups of {q.group_size}" if q.group_size else "per output channel"
        algo = f"{q.weight_quant.upper() if q.weight_quant == 'gptq' else 'RTN'} {group}"
        out["weights"] = f"a source grid kept exactly where found, else {algo}" if keeps_grid else algo
    return out
