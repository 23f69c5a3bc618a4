"""The pass contract: every graph pass is a ``Pass`` whose ``run`` returns a ``PassResult``.

A pass declares ``in_place``:

- True: ``apply`` edits the model it is given. ``run`` copies the model first unless the caller
  says it owns it (``owned=True``, as compile does: it holds one copy of the weights), so a
  caller that does not own the model never sees it modified.
- False: ``apply`` builds a new model and never touches its input.

``requires`` says what the model lacks for the pass, checked before anything is copied; a failed
check raises a one-line ``RptqError`` naming the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import onnx

from rptq_onnx.errors import RptqError

R = TypeVar("R")


@dataclass(frozen=True)
class PassResult(Generic[R]):
    model: onnx.ModelProto
    report: R  # the pass's own typed report
    modified: bool = True


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class Pass(Generic[R]):
    """Subclasses set ``name`` and ``in_place`` and implement ``apply`` (and ``requires`` if any)."""

    name: ClassVar[str]
    in_place: ClassVar[bool] = True

    def requires(self, model: onnx.ModelProto) -> str | None:
        """Why the pass cannot run on ``model``, or None."""
        return None

    def apply(self, model: onnx.ModelProto) -> PassResult[R]:
        raise NotImplementedError

    def run(self, model: onnx.ModelProto, owned: bool = False) -> PassResult[R]:
        """Check the preconditions, then apply; ``owned``: an in-place pass may edit ``model`` itself."""
        why = self.requires(model)
        if why:
            raise RptqError(f"{self.name} pass: {why}")
        target = copy_model(model) if self.in_place and not owned else model
        result = self.apply(target)
        if (result.model is target) != self.in_place and result.modified:
            kind = "in place" if self.in_place else "functional"
            raise AssertionError(f"{self.name} pass is declared {kind} but did not behave so")
        return result
