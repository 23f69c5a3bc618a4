"""Exports of the bundled demo model kept between runs, so `compile` without MODEL does not export it
again every time (28–34 s of a ~100 s compile on 2 cores).

An entry is ``<cache>/<model dir name>-<key>/`` holding what ``export`` writes; the key hashes the
checkpoint's files, the export options and the versions that shape the graph, so a changed
checkpoint or an upgrade gets a new entry. An entry is exported into a temporary directory beside
it and renamed into place whole, so it is complete whenever it exists (two runs racing both export,
one rename wins).

``<cache>``: ``$RPTQ_ONNX_CACHE_DIR``, else ``$XDG_CACHE_HOME/rptq-onnx``, else ``~/.cache/rptq-onnx``.
``RPTQ_ONNX_NO_CACHE=1`` turns the cache off; an unwritable cache directory is skipped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from rptq_onnx import __version__
from rptq_onnx.artifacts import RECORD_NAME
from rptq_onnx.export import DEFAULT_OPSET, export

CACHE_DIR_ENV = "RPTQ_ONNX_CACHE_DIR"
NO_CACHE_ENV = "RPTQ_ONNX_NO_CACHE"
# the packages whose versions change the exported graph
_GRAPH_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")


def cache_root() -> Path | None:
    if os.environ.get(NO_CACHE_ENV, "") not in ("", "0"):
        return None
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rptq-onnx"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_key(model_dir: Path, with_past: bool) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    options = {"rptq_onnx": __version__, "with_past": with_past, "opset": DEFAULT_OPSET, "exporter": "dynamo",
               **{p: _version(p) for p in _GRAPH_PACKAGES}}
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def _complete(entry: Path) -> bool:
    return (entry / "model.onnx").is_file() and (entry / RECORD_NAME).is_file()


def cached_export(model_dir: Path, with_past: bool) -> Path | None:
    """``model.onnx`` of the cached export of ``model_dir`` (exported now on a miss), or None when
    the cache is off or cannot be written (the caller then exports as usual)."""
    root = cache_root()
    if root is None:
        return None
    entry = root / f"{model_dir.name}-{export_key(model_dir, with_past)}"
    if _complete(entry):
        return entry / "model.onnx"
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    except OSError:
        return None
    try:
        export(str(model_dir), work / "out", with_past=with_past)
        if entry.exists() and not _complete(entry):  # a damaged entry (files removed by hand): replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(work / "out", entry)
        except OSError:  # another run's entry got there first, or the rename is refused
            if not _complete(entry):
                return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry / "model.onnx"
