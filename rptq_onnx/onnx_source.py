"""A MODEL argument as an .onnx path: an .onnx file or exported directory as is, anything else exported first."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rptq_onnx.bundled import DEMO_MODEL_DIR
from rptq_onnx.errors import RptqError
from rptq_onnx.export import export
from rptq_onnx.export_cache import cached_export


def resolve_onnx_source(model: str, workdir: Path, with_past: bool, timer=None) -> Path:
    """An .onnx path for ``model``: used as is, or exported first from an HF dir / hub id.

    ``timer``: compile's stage runner (``timer.stage("export")`` times the export), or None."""
    path = Path(model)
    if path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file()):
        if not path.exists():
            raise RptqError(f"{model}: no such file; pass an .onnx model or a Hugging Face model directory")
        return path / "model.onnx" if path.is_dir() else path
    with timer.stage("export") if timer else contextlib.nullcontext():
        if path.is_dir() and path.resolve() == DEMO_MODEL_DIR.resolve():  # the bundled demo: exported once per cache
            cached = cached_export(DEMO_MODEL_DIR, with_past)
            if cached is not None:
                return cached
        return export(model, workdir / "export", with_past=with_past).model_path
