"""The pass contract (passes/base.py) and compile's stage runner (rptq_onnx/stages.py), on the inline OPT graph."""

from __future__ import annotations

import pytest
from inline_opt import inline_opt

from rptq_onnx.errors import RptqError
from rptq_onnx.passes import base
from rptq_onnx.passes.fuse_attention import FuseAttention
from rptq_onnx.passes.quantize_head import HeadReport, QuantizeHead
from rptq_onnx.stages import StageRunner


def test_a_failed_precondition_is_one_line_naming_the_pass():
    model = inline_opt(with_past=False)
    before = model.SerializeToString()
    with pytest.raises(RptqError) as err:
        FuseAttention().run(model)
    assert str(err.value).startswith("fuse_attention pass: --attention fused cannot apply: the graph has no KV cache")
    assert "\n" not in str(err.value)
    assert model.SerializeToString() == before


def test_an_in_place_pass_edits_the_model_it_owns_without_copying(monkeypatch):
    model = inline_opt()
    monkeypatch.setattr(base, "copy_model", lambda m: pytest.fail("an owned model was copied"))
    result = QuantizeHead(8, block_size=16).run(model, owned=True)
    assert QuantizeHead.in_place and result.model is model and result.modified
    assert isinstance(result.report, HeadReport) and result.report.head == "MatMulNBits"
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}


def test_a_caller_that_does_not_own_the_model_gets_a_copy():
    model = inline_opt()
    before = model.SerializeToString()
    result = QuantizeHead(8, block_size=16).run(model)
    assert result.model is not model and model.SerializeToString() == before


def test_the_runner_names_the_stages_already_run_when_one_fails():
    runner, model = StageRunner(), inline_opt()
    with runner.stage("calibrate"):
        pass
    runner.run("head", QuantizeHead(8, block_size=16), model)
    with pytest.raises(RptqError) as err:
        runner.run("fuse", FuseAttention(), model)
    message = str(err.value)
    assert "\n" not in message and message.startswith("fuse_attention pass: ")
    assert message.endswith("(in stage fuse, after calibrate, head)")
    assert list(runner.timings) == ["calibrate", "head"] and isinstance(runner.reports["head"], HeadReport)


def test_the_runner_notes_where_an_unexpected_error_happened():
    runner = StageRunner()
    with pytest.raises(KeyError) as err, runner.stage("cluster"):
        raise KeyError("R9")
    assert err.value.__notes__ == ["rptq-onnx: in stage cluster"]
