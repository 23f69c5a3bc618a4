"""Data shipped inside the package: the demo OPT checkpoint and the State of the Union texts."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEMO_MODEL_DIR = DATA_DIR / "demo-opt"
TEXTS = {"sotu-train": DATA_DIR / "sotu" / "train.txt", "sotu-test": DATA_DIR / "sotu" / "test.txt"}


def text_path(name: str) -> Path | None:
    """The file of a bundled text name (``sotu-train``, ``sotu-test``), else None."""
    return TEXTS.get(name)
