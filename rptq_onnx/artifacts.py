"""The output directory's contract: the files `export` and `compile` write into OUT_DIR, and their readers.

``export`` writes the model, the tokenizer/config files and ``export.json``; ``compile`` adds
``clusters.json``, ``ranges.safetensors``, ``report.json`` and, with ``--report``, ``report.md``
plus PNGs in ``report/``. Writing into an OUT_DIR again removes the ``OWNED_FILES`` the new run
lacks (never ``report/``: a user's own files may sit there beside the plots).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from rptq_onnx.clustering import ClusterPlan
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import EXTERNAL_DATA_SUFFIX, GraphIndex

MODEL_FILES = ("model.onnx", "model.onnx" + EXTERNAL_DATA_SUFFIX)
RECORD_NAME = "export.json"
CLUSTERS_NAME = "clusters.json"  # compile's outputs beside the model
REPORT_NAME = "report.json"
RANGES_NAME = "ranges.safetensors"
MARKDOWN_NAME = "report.md"
GENAI_CONFIG_NAME = "genai_config.json"  # beside a model onnxruntime-genai can run (rptq_onnx.genai)
REPORT_DIR = "report"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json", "config.json",
                   "chat_template.jinja", "tokenizer.model")
# what export and compile write into OUT_DIR; writing there again removes those the new run lacks
# (not report/: a user's own files may sit there beside the plots)
OWNED_FILES = (*MODEL_FILES, *TOKENIZER_FILES, RECORD_NAME, CLUSTERS_NAME, REPORT_NAME, RANGES_NAME, MARKDOWN_NAME,
               GENAI_CONFIG_NAME)


def model_limits(onnx_path: Path, model: onnx.ModelProto) -> tuple[int, int | None]:
    """(vocab size, max positions) from export.json beside the model, else from the graph."""
    record = onnx_path.parent / RECORD_NAME
    if record.is_file():
        cfg = json.loads(record.read_text()).get("config", {})
        if "vocab_size" in cfg:
            return int(cfg["vocab_size"]), cfg.get("max_position_embeddings")
    index = GraphIndex(model)
    for node in index.value_readers("input_ids"):
        if node.op_type == "Gather" and node.input[1] == "input_ids":
            shape = index.constant_shape(node.input[0])
            if shape:
                return int(shape[0]), None
    raise RptqError("cannot tell the vocabulary size: no export.json beside the model and no token embedding found")


def load_cluster_plans(model_path: str | os.PathLike) -> list[dict[str, ClusterPlan]] | None:
    """The plan written by ``compile`` beside ``model_path``, or None for an uncompiled model."""
    path = Path(model_path)
    path = path if path.is_dir() else path.parent
    f = path / CLUSTERS_NAME
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return [{p: ClusterPlan.from_dict(d) for p, d in layer.items()} for layer in data["layers"]]
