"""Compile's stage runner: runs its stages and passes in order, times each, keeps each pass's
typed report, and names the stages already run when one fails."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import onnx

from rptq_onnx.errors import RptqError
from rptq_onnx.passes.base import Pass, PassResult, R


class StageRunner:
    """``log(name)``, when given, is called as each stage starts (progress lines)."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.timings: dict[str, float] = {}  # stage → seconds (report.json's timings_s)
        self.reports: dict[str, object] = {}  # stage → its pass's report
        self.done: list[str] = []
        self.log = log

    def context(self, name: str) -> str:
        return f"in stage {name}, after {', '.join(self.done)}" if self.done else f"in stage {name}"

    @contextmanager
    def stage(self, name: str):
        if self.log:
            self.log(name)
        t0 = time.perf_counter()
        try:
            yield
        except RptqError as error:  # still one line, now saying where
            raise RptqError(f"{error} ({self.context(name)})") from error
        except Exception as error:
            error.add_note(f"rptq-onnx: {self.context(name)}")
            raise
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.done.append(name)

    def run(self, name: str, step: Pass[R], model: onnx.ModelProto) -> PassResult[R]:
        """Run ``step`` as stage ``name`` on ``model``, which compile owns (an in-place pass edits it)."""
        with self.stage(name):
            return self.apply(name, step, model)

    def apply(self, name: str, step: Pass[R], model: onnx.ModelProto) -> PassResult[R]:
        """Run ``step`` within the current stage; its report is kept as ``reports[name]``."""
        result = step.run(model, owned=True)
        self.reports[name] = result.report
        return result
