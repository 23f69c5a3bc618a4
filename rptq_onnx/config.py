"""Compile configuration: frozen dataclasses with a JSON round trip (stamped into outputs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from rptq_onnx.anatomy import POINTS
from rptq_onnx.errors import RptqError

PRESETS = ("reorder", "W16A16")
LAYOUTS = ("zero-copy", "contiguous")


@dataclass(frozen=True)
class ClusterCounts:
    """KMeans cluster counts per reorder point (R2/R3 are per head). Reference defaults."""

    R1: int = 32
    R2: int = 4
    R3: int = 4
    R4: int = 32
    R5: int = 32

    @classmethod
    def parse(cls, text: str | None) -> ClusterCounts:
        """``"R1=32,R2=4"`` (unnamed points keep their defaults); ``"all=1"`` sets every point."""
        if not text:
            return cls()
        values: dict[str, int] = {}
        for item in text.split(","):
            key, sep, raw = item.strip().partition("=")
            key = key.strip()
            if not sep or key not in (*POINTS, "all"):
                raise RptqError(f"--clusters: '{item.strip()}' is not POINT=K; use keys {', '.join(POINTS)} or all, e.g. R1=32,R2=4")
            try:
                k = int(raw)
            except ValueError:
                raise RptqError(f"--clusters: {key}={raw.strip()} is not an integer cluster count") from None
            if k < 1:
                raise RptqError(f"--clusters: {key}={k}; a cluster count must be at least 1")
            if key == "all":
                values.update({p: k for p in POINTS})
            else:
                values[key] = k
        return cls(**values)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.as_dict().items())


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
class CompileConfig:
    preset: str = "reorder"
    clusters: ClusterCounts = field(default_factory=ClusterCounts)
    calib: CalibConfig = field(default_factory=CalibConfig)
    layout: str = "zero-copy"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise RptqError(f"--preset {self.preset} is not available; choose one of {', '.join(PRESETS)}")
        if self.layout not in LAYOUTS:
            raise RptqError(f"--layout {self.layout} is unknown; choose one of {', '.join(LAYOUTS)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompileConfig:
        d = json.loads(text)
        return cls(preset=d["preset"], clusters=ClusterCounts(**d["clusters"]), calib=CalibConfig(**d["calib"]),
                   layout=d["layout"])
