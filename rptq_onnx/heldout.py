"""Held-out English text that any Python installation carries, for checking that quantization ranges
fitted to the calibration text (SOTU speeches) hold on text they never saw.

``python-docs``: the prose paragraphs of the Python language reference that CPython ships for
``help()`` (``pydoc_data.topics``): technical English, another register than political speeches.
Grammar, indented code and interactive examples are left out; the paragraphs keep their order by topic name,
each once, so the text is the same bytes for the same Python version.
"""

from __future__ import annotations

HELDOUT_TEXTS = ("python-docs",)
_MIN_WORDS = 8  # shorter paragraphs are headings and fragments
_RULES = set("*=-~^")  # reStructuredText heading underlines


def python_docs_prose() -> str:
    from pydoc_data.topics import topics

    seen, paragraphs = set(), []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.strip("\n").splitlines()
            if not lines or any(not line.strip() or line[0].isspace() or line.startswith((">>>", "..."))
                                or set(line.strip()) <= _RULES for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= _MIN_WORDS and text not in seen:
                seen.add(text)
                paragraphs.append(text)
    return "\n\n".join(paragraphs) + "\n"


def heldout_text(name: str) -> str | None:
    """The held-out text called ``name``, or None when ``name`` is not one."""
    return python_docs_prose() if name == "python-docs" else None
