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


# --- the output is checked before any work ------------------------------------------------------------------

@pytest.fixture
def junk_model(tmp_path):
    """An .onnx "model" that loading would refuse: a refusal naming -o proves the output was checked first."""
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(b"not an onnx model")
    return src


@pytest.mark.parametrize("command", ["compile", "export"])
def test_output_is_an_existing_file(tmp_path, junk_model, command):
    out = tmp_path / "taken"
    out.write_text("mine")
    source = junk_model if command == "compile" else junk_model.parent
    proc = run_cli(command, source, "-o", out, *(["--calib", "random"] if command == "compile" else []))
    assert_refused(proc, f"-o {out}: exists and is not a directory", inputs={junk_model.parent: snapshot(junk_model.parent)})
    assert out.read_text() == "mine" and leftovers(out) == ["taken"]


def test_output_below_a_file(tmp_path, junk_model):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    assert_refused(run_cli("compile", junk_model, "-o", out, "--calib", "random"), "is a file, not a directory")


def _without_root_powers() -> list[str]:
    """A command prefix under which permissions apply (root's DAC override dropped), or skip."""
    if os.geteuid() != 0:
        return []
    import shutil

    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions do not apply")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def run_cli_under(prefix: list[str], *args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "rptq_onnx", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO)


def test_output_in_a_directory_without_write_permission(tmp_path, junk_model):
    prefix = _without_root_powers()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = {junk_model.parent: snapshot(junk_model.parent)}
        out = ro / "out"
        proc = run_cli_under(prefix, "compile", junk_model, "-o", out, "--calib", "random")
        assert_refused(proc, f"-o {out}: cannot write in {ro} (permission denied)", out=out, inputs=before)
        deep = ro / "a" / "b"  # a new OUT_DIR several levels down: the nearest existing folder counts
        assert_refused(run_cli_under(prefix, "export", junk_model.parent, "-o", deep), f"cannot write in {ro}")
        assert not (ro / "a").exists()
    finally:
        ro.chmod(0o755)


def test_output_on_a_read_only_filesystem(tmp_path, junk_model):
    """A read-only bind mount in a private mount namespace (needs root; skipped elsewhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a read-only mount here (needs root and unshare)")
    out = ro / "out"
    script = f'mount --bind "{ro}" "{ro}" && mount -o remount,ro,bind "{ro}" && exec "$@"'
    proc = run_cli_under(["unshare", "-m", "sh", "-c", script, "sh"], "compile", junk_model, "-o", out,
                         "--calib", "random")
    assert_refused(proc, f"-o {out}: cannot write in {ro} (read-only filesystem)", out=out)


def test_not_enough_space_is_refused_before_work(tmp_path):
    from rptq_onnx.errors import RptqError
    from rptq_onnx.outdir import check_writable

    with pytest.raises(RptqError, match="MiB free on its filesystem, the output needs about"):
        check_writable(tmp_path / "out", need_bytes=1 << 62)
    check_writable(tmp_path / "out", need_bytes=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_new_parent_folders_are_removed_after_a_failure(tmp_path, junk_model):
    out = tmp_path / "new" / "deeper" / "out"
    proc = run_cli("compile", junk_model, "-o", out, "--calib", "random")
    assert_refused(proc, "not a readable ONNX model")
    assert not (tmp_path / "new").exists()


# --- what killed runs leave behind, and a lock on OUT_DIR ---------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def ours_in(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("rptq-"))


@pytest.mark.slow
def test_stale_staging_and_temp_dirs_of_a_dead_run_are_removed(tmp_path, junk_model):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    tmpdir.mkdir()
    pid = dead_pid()
    stale = tmp_path / f".out.staging-{pid}-k2j4"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"partial")
    (tmpdir / f"rptq-compile-{pid}-x1y2").mkdir()
    alive = tmp_path / f".out.staging-{os.getpid()}-live"  # a live process's staging is left alone
    alive.mkdir()
    unrelated = tmp_path / ".other.staging-1-abc"
    unrelated.mkdir()
    proc = run_cli("compile", junk_model, "-o", out, "--calib", "random", env_extra={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"removed .out.staging-{pid}-k2j4" in proc.stderr
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert ours_in(tmpdir) == []
    assert leftovers(out) == [alive.name]


@pytest.mark.slow
def test_a_held_lock_refuses_a_second_run_at_once(tmp_path, junk_model):
    from rptq_onnx.outdir import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        proc = run_cli("compile", junk_model, "-o", out, "--calib", "random")
        assert_refused(proc, f"-o {out}: another rptq-onnx run (pid {os.getpid()}) is writing this directory")
        proc = run_cli("export", junk_model.parent, "-o", out)
        assert_refused(proc, f"(pid {os.getpid()})")
    assert leftovers(out) == []  # the lock file goes with its holder


# --- faults during a real compile (slow: they export and compile a tiny model) -------------------------------

# Runs the CLI with one function wrapped: after it returns it touches $RPTQ_TEST_SAVED, then waits for
# $RPTQ_TEST_GO (or, before it runs, raises $RPTQ_TEST_ERRNO as an OSError naming its last argument).
PAUSE = """
import os, sys, time
import {module} as c
orig = c.{function}
def paused(*args):
    if os.environ.get("RPTQ_TEST_ERRNO"):
        code = int(os.environ["RPTQ_TEST_ERRNO"])
        raise OSError(code, os.strerror(code), str(args[-1]))
    out = orig(*args)
    open(os.environ["RPTQ_TEST_SAVED"], "w").close()
    while not os.path.exists(os.environ["RPTQ_TEST_GO"]):
        time.sleep(0.05)
    return out
c.{function} = paused
from rptq_onnx.cli import main
sys.exit(main(sys.argv[1:]))
"""
# compile's save_model: model.onnx is written into the staging directory
PAUSED_SAVE = PAUSE.format(module="rptq_onnx.compile", function="save_model")
# a layer-wise compile has written its first layer's tensors to the output's data file
PAUSED_LAYER = PAUSE.format(module="rptq_onnx.compile_layerwise", function="_compact")
QUICK = ("--calib", "random", "--nsamples", "2", "--seqlen", "16", "-q")


def start_paused_compile(model, out, tmp_path, tmpdir, script=PAUSED_SAVE):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), "RPTQ_TEST_SAVED": str(tmp_path / "saved"),
           "RPTQ_TEST_GO": str(tmp_path / "go")}
    return subprocess.Popen([sys.executable, "-c", script, "compile", str(model), "-o", str(out), *QUICK],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc, seconds=300):
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def compile_paused_at_save(model, tmp_path, script=PAUSED_SAVE):
    """A compile into tmp_path/out (TMPDIR tmp_path/tmp) that has written its staging (or, with
    ``PAUSED_LAYER``, its first layer) and now waits: (process, OUT_DIR, TMPDIR)."""
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = start_paused_compile(model, out, tmp_path, tmpdir, script)
    wait_for(tmp_path / "saved", proc)
    return proc, out, tmpdir


@pytest.fixture
def tiny_model(exported):
    model = exported("tiny")
    return model, snapshot(model.parent)


@pytest.mark.slow
@pytest.mark.parametrize("script", [PAUSED_SAVE, PAUSED_LAYER], ids=["save", "layer-wise-after-layer-0"])
def test_sigkill_during_save_then_rerun(tmp_path, tiny_model, script):
    import signal

    model, before = tiny_model
    proc, out, tmpdir = compile_paused_at_save(model, tmp_path, script)
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(f".out.staging-{proc.pid}-")]
    work = [tmpdir / name for name in ours_in(tmpdir)]  # the killed run's work directory, which it cannot remove
    assert len(work) == 1
    if script is PAUSED_SAVE:
        assert len(staging) == 1 and (staging[0] / "model.onnx").is_file()
    else:  # no staging yet: layer 0's tensors are going to the data file in the work directory
        assert staging == [] and (work[0] / "model.onnx.data").is_file()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = run_cli("compile", model, "-o", out, *QUICK, env_extra={"TMPDIR": str(tmpdir)})
    assert rerun.returncode == 0, rerun.stderr
    assert all(f"removed {s.name}" in rerun.stderr for s in staging)
    assert leftovers(out) == ["out"] and (out / "model.onnx").is_file()
    assert ours_in(tmpdir) == [] and snapshot(model.parent) == before


@pytest.mark.slow
@pytest.mark.parametrize("script", [PAUSED_SAVE, PAUSED_LAYER], ids=["save", "layer-wise-after-layer-0"])
def test_sigterm_during_save_leaves_nothing(tmp_path, tiny_model, script):
    import signal

    model, before = tiny_model
    proc, out, tmpdir = compile_paused_at_save(model, tmp_path, script)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and stderr.strip() == "rptq-onnx: terminated", stderr
    assert leftovers(out) == [] and ours_in(tmpdir) == [] and snapshot(model.parent) == before


@pytest.mark.slow
def test_two_compiles_into_one_directory(tmp_path, tiny_model):
    model, before = tiny_model
    first, out, tmpdir = compile_paused_at_save(model, tmp_path)
    second = run_cli("compile", model, "-o", out, *QUICK, "--preset", "W8A8", env_extra={"TMPDIR": str(tmpdir)})
    assert_refused(second, f"another rptq-onnx run (pid {first.pid}) is writing this directory")
    (tmp_path / "go").touch()
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert leftovers(out) == ["out"] and ours_in(tmpdir) == [] and snapshot(model.parent) == before
    assert '"preset": "reorder"' in (out / "report.json").read_text()


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line(tmp_path, tiny_model):
    import errno

    model, before = tiny_model
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RPTQ_TEST_ERRNO": str(errno.ENOSPC)}
    proc = subprocess.run([sys.executable, "-c", PAUSED_SAVE, "compile", str(model), "-o", str(out), *QUICK],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_refused(proc, f"-o {out}: writing the output failed (No space left on device)", out=out,
                   inputs={model.parent: before})
    assert ".staging-" not in proc.stderr


@pytest.mark.slow
def test_file_size_limit_during_calibration_is_one_line(tmp_path, tiny_model):
    import resource

    model, before = tiny_model
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = run_cli("compile", model, "-o", out, *QUICK, preexec_fn=limit)
    assert_refused(proc, "failed (File too large)", out=out, inputs={model.parent: before})


@pytest.mark.slow
def test_every_output_file_is_world_readable(tmp_path, tiny_model):
    model, _ = tiny_model
    out = tmp_path / "out"
    proc = run_cli("compile", model, "-o", out, *QUICK)
    assert proc.returncode == 0, proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --- flags that do not apply, and messages that name the flag typed ------------------------------------------

@pytest.fixture
def hf_without_tokenizer(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "opt"}')
    return folder


@pytest.mark.parametrize("args,fragments", [
    (["compile", "JUNK", "-o", "OUT", "--calib", "random", "--no-past"],
     ["--no-past applies only when compile exports first", "already ONNX"]),
    (["compile", "JUNK", "-o", "OUT", "--calib", "random", "--with-past"], ["--with-past applies only when"]),
    (["compile", "JUNK", "-o", "OUT", "--calib", "random", "--preset", "W4A16", "--kv-only"],
     ["--kv-only: W4A16 quantizes no activations"]),
    (["compile", "JUNK", "-o", "OUT", "--calib", "random", "--clusters", "R1=4,R1=8"],
     ["--clusters R1=4,R1=8: R1= sets a point already set"]),
    (["compile", "JUNK", "-o", "OUT", "--calib", "random", "--clusters", "R2=2,all=4"], ["all= sets a point already set"]),
    pytest.param(["compile", "HF", "-o", "OUT", "--calib", "sotu-train"], ["no tokenizer files beside the model",
                                                                         "--calib random"], marks=pytest.mark.slow),
    pytest.param(["compile", "HF", "-o", "OUT", "--calib", "missing.txt"], ["--calib missing.txt: no such file"],
                 marks=pytest.mark.slow),
    (["generate", "JUNK", "--prompt", "x", "--temperature", "0.5"], ["--temperature only with --do-sample"]),
    (["generate", "JUNK", "--prompt", "x", "--top-k", "5", "--top-p", "0.9"], ["--top-k, --top-p only with --do-sample"]),
    (["generate", "JUNK", "--prompt", "x", "--providers", "FooExecutionProvider"],
     ["--providers: FooExecutionProvider is not an execution provider", "available: ", "CPUExecutionProvider"]),
    (["inspect", "JUNK", "--ranges", "r.png", "--error"], ["argument --error: not allowed with argument --ranges"]),
    (["inspect", "JUNK", "--ranges", "r.png", "--placement"], ["not allowed with argument --ranges"]),
    (["inspect", "JUNK", "--point", "R2"], ["--point applies only with --ranges"]),
    (["inspect", "JUNK", "--error", "--layer", "1"], ["--layer applies only with --ranges"]),
    (["inspect", "JUNK", "--plot", "p.png"], ["--plot applies only with --error"]),
    (["inspect", "JUNK", "--providers", "CPUExecutionProvider"], ["--providers applies only with --placement"]),
    (["inspect", "JUNK", "--ranges", "r.png", "--json"], ["--json does not apply to --ranges"]),
    pytest.param(["eval", "JUNK", "--text", "missing.txt"], ["--text missing.txt: no such file", "sotu-test"],
                 marks=pytest.mark.slow),
])
def test_flags_that_do_not_apply(tmp_path, junk_model, hf_without_tokenizer, args, fragments):
    out = tmp_path / "out"
    subst = {"JUNK": junk_model, "HF": hf_without_tokenizer, "OUT": out}
    before = {junk_model.parent: snapshot(junk_model.parent), hf_without_tokenizer: snapshot(hf_without_tokenizer)}
    proc = run_cli(*[subst.get(a, a) for a in args])
    assert_refused(proc, *fragments, out=out, inputs=before)
    assert "'random'" not in proc.stderr or args[0] != "eval"


@pytest.mark.slow
def test_external_data_outside_the_model_folder(tmp_path):
    """A small initializer whose external data points outside the model's folder: one line, not a traceback."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    before = snapshot(folder)
    assert_refused(run_cli("inspect", folder / "model.onnx"), "points outside", "must sit in the model's folder",
                   inputs={folder: before})
    out = tmp_path / "out"
    assert_refused(run_cli("compile", folder / "model.onnx", "-o", out, "--calib", "random", "-q"), "points outside",
                   out=out)


@pytest.mark.slow
def test_eval_max_tokens_below_one_window_says_so(compiled_text_opt, tmp_path):
    model = compiled_text_opt("W4A4KV")
    text = tmp_path / "short.txt"
    text.write_text("The state of the Union is strong, and the people of this nation are free. " * 8)
    proc = run_cli("eval", model / "model.onnx", "--text", text, "--max-tokens", "20", "--seqlen", "32")
    assert_refused(proc, "--max-tokens 20 keeps 20 tokens, fewer than one window of --seqlen 32")


@pytest.mark.slow
def test_generate_without_a_decode_step(compiled_text_opt):
    proc = run_cli("generate", compiled_text_opt("W4A4KV"), "--prompt", "The state", "--max-new-tokens", "1")
    assert proc.returncode == 0, proc.stderr
    assert "nan" not in proc.stderr and "no decode step ran" in proc.stderr


@pytest.mark.slow
def test_compile_prints_stage_lines_when_not_a_terminal(tmp_path, exported):
    proc = run_cli("compile", exported("tiny"), "-o", tmp_path / "out", *QUICK[:-1])
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rptq-onnx: ") and "…" in ln]
    assert [ln.split()[1].rstrip(",") for ln in lines] == ["prologue", "layers", "layer", "layer", "save"], proc.stderr
    assert "layer 1/2 …" in lines[2] and "layer 2/2, about" in lines[3]  # one line per layer, with an estimate
    assert "\r" not in proc.stderr  # no progress bar in a log
    whole = run_cli("compile", exported("tiny"), "-o", tmp_path / "whole", *QUICK[:-1], "--whole-graph")
    stages = [ln.split()[1] for ln in whole.stderr.splitlines() if ln.startswith("rptq-onnx: ") and "…" in ln]
    assert stages == ["calibrate", "cluster", "fold", "save"], whole.stderr
