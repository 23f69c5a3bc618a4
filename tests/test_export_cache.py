"""The demo-export cache: one export per checkpoint and options, reused, rebuilt when damaged, switchable off."""

from __future__ import annotations

import pytest

from rptq_onnx import export_cache
from rptq_onnx.export_cache import cached_export, export_key

pytestmark = pytest.mark.slow  # every test here exports or compiles a model


def test_export_is_cached_and_reused(opt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RPTQ_ONNX_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = opt_dir("tiny")
    first = cached_export(model_dir, with_past=False)
    assert first.is_file() and first.parent.parent == tmp_path / "cache"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.parent.name]  # no temporary left behind

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export_cache, "export", no_export)
    assert cached_export(model_dir, with_past=False) == first
    with pytest.raises(AssertionError, match="exported again"):  # other options: another entry
        cached_export(model_dir, with_past=True)
    assert export_key(model_dir, True) != export_key(model_dir, False)


def test_damaged_entry_is_rebuilt_and_cache_can_be_off(opt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RPTQ_ONNX_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = opt_dir("tiny")
    first = cached_export(model_dir, with_past=False)
    (first.parent / "export.json").unlink()
    again = cached_export(model_dir, with_past=False)
    assert again == first and (first.parent / "export.json").is_file()
    monkeypatch.setenv("RPTQ_ONNX_NO_CACHE", "1")
    assert cached_export(model_dir, with_past=False) is None


def test_unwritable_cache_falls_back(opt_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RPTQ_ONNX_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    assert cached_export(opt_dir("tiny"), with_past=False) is None
