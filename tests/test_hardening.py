"""Bad input and faults, as a new user meets them (docs/hardening.md lists every kind tried).

Each refusal: exit 2, exactly one stderr line, no traceback, no output directory or staging left
behind, the input unchanged. Most are refused before any export or calibration, so they are fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, env_extra=None, cwd=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rptq_onnx", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd or REPO, **kwargs)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) → its bytes."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """What a run left beside ``out``: the directory itself, staging directories, a lock file."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def assert_refused(proc, *fragments, out: Path | None = None, inputs: dict | None = None):
    """Exit 2, one non-empty stderr line naming ``fragments``, no traceback; nothing left; inputs unchanged."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rptq-onnx: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], lines[0]
    if out is not None:
        assert leftovers(out) == [], leftovers(out)
    for path, before in (inputs or {}).items():
        assert snapshot(path) == before, f"{path} was modified"


# --- startup: the parser imports nothing heavy ------------------------------------------------------------

HEAVY = ("torch", "transformers", "onnxruntime", "onnx", "sklearn")


def test_parsing_and_help_import_nothing_heavy():
    code = ("import sys\n"
            "from rptq_onnx.cli import build_parser\n"
            "p = build_parser()\n"
            "p.parse_args(['compile', '-o', 'x', '--preset', 'W4A4'])\n"
            "p.format_help()\n"
            "for name in ('export', 'compile', 'eval', 'generate', 'memory', 'inspect'):\n"
            "    try:\n"
            "        p.parse_args([name, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy:", f"imported while parsing: {proc.stdout.splitlines()[-1]}"


def test_usage_error_imports_nothing_heavy():
    code = ("import sys, runpy\n"
            "sys.argv = ['rptq-onnx', 'compile', '-o', 'x', '--wbits', 'abc']\n"
            "try:\n"
            "    runpy.run_module('rptq_onnx', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            f"print(code, ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.split() == ["2"], proc.stdout


# --- argparse's own errors: one line ------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["compile", "-o", "OUT", "--wbits", "abc"], "argument --wbits: invalid int value: 'abc'"),
    (["compile", "--preset", "W4A4"], "the following arguments are required: -o/--output"),
    (["compile", "-o", "OUT", "--bogus"], "unrecognized arguments: --bogus"),
    (["compile", "-o", "OUT", "--layout", "diagonal"], "argument --layout: invalid choice"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["generate", "MODEL"], "required: --prompt"),
])
def test_usage_errors_are_one_line(tmp_path, args, fragment):
    out = tmp_path / "out"
    args = [out if a == "OUT" else tmp_path / "m.onnx" if a == "MODEL" else a for a in args]
    proc = run_cli(*args)
    assert_refused(proc, fragment, out=out)
    assert "usage:" not in proc.stderr
