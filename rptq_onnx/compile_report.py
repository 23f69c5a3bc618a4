"""`compile`'s report (``report.json``) as typed records; ``to_json`` gives the file's layout."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from rptq_onnx.config import CompileConfig
from rptq_onnx.passes.emit_qdq import QdqReport
from rptq_onnx.passes.fuse_attention import FuseReport
from rptq_onnx.passes.quantize_head import HeadReport
from rptq_onnx.passes.quantize_kv_cache import KvCacheReport
from rptq_onnx.passes.quantize_weights import WeightsReport


@dataclass
class WeightQuantization(WeightsReport):
    """The weights pass's counts and how the codes were made."""

    algorithm: str = "gptq"
    bits: int = 16
    group_size: int | None = None
    group_sizes_used: list[int] = field(default_factory=list)  # 0: per output channel
    source_grid: str = "keep"
    accuracy_level: int = 0
    grid_offset: str = "term"


@dataclass
class ActivationQuantization(QdqReport):
    scale_range: list[float] = field(default_factory=list)  # [smallest, largest] scale over all points


@dataclass
class QuantizationReport:
    """What each quantization pass did; a pass that did not run is left out of the JSON (``weights``
    and ``activations`` are listed, maybe null, whenever the quantize stage ran)."""

    name: str  # W{w}A{a}[KV]
    quantized: bool = False  # the quantize stage ran
    weights: WeightQuantization | None = None
    activations: ActivationQuantization | None = None
    kv_cache: KvCacheReport | None = None
    attention: FuseReport | None = None
    head: HeadReport | None = None

    def to_json(self) -> dict:
        out: dict = {"name": self.name}
        if self.quantized:
            out["weights"] = _plain(self.weights)
            out["activations"] = _plain(self.activations)
        for key in ("kv_cache", "attention", "head"):
            if getattr(self, key) is not None:
                out[key] = _plain(getattr(self, key))
        return out


@dataclass
class CalibrationSummary:
    windows: int
    seqlen: int
    tokens: int
    source: str


@dataclass
class RecipeChoices:
    name: str  # rptq_onnx/recipes.py
    choices: dict[str, str]  # point (and "P", "weights") → what the recipe chose there, in words


@dataclass
class CompileReport:
    rptq_onnx: str  # the version that compiled
    source: str
    config: CompileConfig  # as compiled (``attention="auto"`` resolved)
    layers: int
    calibration: CalibrationSummary
    clusters: list[dict[str, int | None]]  # per layer and point; None: not clustered
    cluster_sizes: list[dict[str, list[int] | None]]  # [smallest, largest] cluster
    layout: str
    gathers_added: int
    permuted_initializers: int
    copied_shared_initializers: list[str]
    quantization: QuantizationReport
    recipe: RecipeChoices
    mode: str = "layer-wise"  # or "whole-graph" (rptq_onnx/compile_layerwise.py)
    timings_s: dict[str, float] = field(default_factory=dict)  # per stage, and "total"
    peak_rss_mb: float = 0.0

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(config=json.loads(self.config.to_json()), calibration=dataclasses.asdict(self.calibration),
                   quantization=self.quantization.to_json(), recipe=dataclasses.asdict(self.recipe))
        return out


def _plain(report) -> dict | None:
    return None if report is None else report.as_dict() if hasattr(report, "as_dict") else dataclasses.asdict(report)
