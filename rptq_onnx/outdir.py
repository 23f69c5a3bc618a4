"""Claiming an output directory before any work, and cleaning up after runs that were killed.

``claim_output(OUT_DIR)`` runs before export or calibration: it refuses an OUT_DIR that is a file,
the input's own directory, unwritable, or (where the size can be estimated) on a filesystem without
room; then it takes a lock, ``.OUT_DIR.lock`` beside OUT_DIR (``fcntl.flock``, holding the pid), so a
second run into the same OUT_DIR fails at once, naming the holder.

Everything we leave while working carries the pid of the process that made it:
``.OUT_DIR.staging-PID-XXXX/`` beside OUT_DIR (graph.staged_output) and ``rptq-KIND-PID-XXXX/`` in
$TMPDIR (``work_dir``). A run killed outright (SIGKILL, power loss) cannot remove them; the next run
removes those whose process is gone. Staging directories are only created and removed under the
lock, so a live run's staging is never taken for stale (not even from another pid namespace).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rptq_onnx.errors import RptqError

STAGING = ".staging-"


def staging_prefix(out_dir: Path) -> str:
    """Name prefix of this process's staging directories for ``out_dir`` (an absolute path)."""
    return f".{out_dir.name}{STAGING}{os.getpid()}-"


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Entries of ``folder`` whose name matches ``pattern`` (group 1: a pid) and whose process is gone."""
    found = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            m = pattern.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                found.append(entry)
    return sorted(found)


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        return False
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging directories of killed runs into ``out_dir``; return those removed."""
    pattern = re.compile(re.escape(f".{out_dir.name}{STAGING}") + r"(\d+)-")
    return [p for p in _stale(out_dir.parent, pattern) if _remove(p)]


def remove_stale_work_dirs() -> list[Path]:
    """Remove ``rptq-KIND-PID-*`` temporary directories of killed runs from $TMPDIR."""
    pattern = re.compile(r"rptq-[a-z]+-(\d+)-")
    return [p for p in _stale(Path(tempfile.gettempdir()), pattern) if _remove(p)]


@contextlib.contextmanager
def work_dir(kind: str) -> Iterator[Path]:
    """A temporary directory ``$TMPDIR/rptq-KIND-PID-XXXX``, removed on exit (stale ones of killed runs too)."""
    remove_stale_work_dirs()
    with tempfile.TemporaryDirectory(prefix=f"rptq-{kind}-{os.getpid()}-") as tmp:
        yield Path(tmp)


def check_output_dir(out_dir: str | os.PathLike, source: str | None = None) -> None:
    """Refuse an OUT_DIR that is a file or the directory of the input model (it would be overwritten)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RptqError(f"-o {out_dir}: exists and is not a directory; choose another -o/--output")
    if source is None or not Path(source).exists():
        return  # a hub id or a bundled name
    src = Path(source)
    src_dir = src if src.is_dir() else src.parent
    if out.resolve() == src_dir.resolve():
        raise RptqError(f"-o {out_dir} is the directory of the input model {source}; choose another output "
                        "directory (the input is never modified)")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out_dir: str | os.PathLike, need_bytes: int = 0) -> None:
    """Refuse an OUT_DIR we could not write (permissions, read-only filesystem, no room for ``need_bytes``)."""
    out = Path(out_dir).resolve()
    where = _existing_ancestor(out.parent)
    if not where.is_dir():
        raise RptqError(f"-o {out_dir}: {where} is a file, not a directory; choose another -o/--output")
    for folder in (where, out) if out.is_dir() else (where,):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RptqError(f"-o {out_dir}: cannot write in {folder} ({_access_reason(folder)}); choose another "
                            "-o/--output")
    if need_bytes:
        free = shutil.disk_usage(where).free
        if free < need_bytes:
            raise RptqError(f"-o {out_dir}: {free / 2**20:,.0f} MiB free on its filesystem, the output needs about "
                            f"{need_bytes / 2**20:,.0f} MiB; free some space or choose another -o/--output")


def _access_reason(folder: Path) -> str:
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only filesystem"
    return "permission denied"


def write_error(out_dir: str | os.PathLike, exc: OSError) -> RptqError:
    """A failed write (disk full, read-only, …) as one line naming OUT_DIR, not the staging directory."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
    hint = "; free some space and run again" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return RptqError(f"-o {out_dir}: writing the output failed ({reason}); {out_dir} was left as it was{hint}")


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``.OUT_DIR.lock`` beside OUT_DIR; a second holder is refused at once, naming the first's pid."""
    out = Path(out_dir).resolve()
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RptqError(f"-o {out_dir}: cannot write in {out.parent} ({exc.strerror}); choose another "
                            "-o/--output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise RptqError(f"-o {out_dir}: another rptq-onnx run ({who}) is writing this directory; wait for it to "
                            "finish or choose another -o/--output") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the lock file between our open and flock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if _same_file(fd, path):
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


@contextlib.contextmanager
def claim_output(out_dir: str | os.PathLike, source: str | None = None, need_bytes: int = 0) -> Iterator[None]:
    """Check OUT_DIR, lock it, and remove what killed runs into it left; all before any work."""
    check_output_dir(out_dir, source)
    check_writable(out_dir, need_bytes)
    out = Path(out_dir).resolve()
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RptqError(f"-o {out_dir}: cannot create {out.parent} ({exc.strerror}); choose another -o/--output") from None
    try:
        with output_lock(out_dir):
            for stale in remove_stale_staging(out):
                print(f"rptq-onnx: removed {stale.name}, the partial output of a run that was killed", file=sys.stderr)
            remove_stale_work_dirs()
            yield
    except BaseException:
        for p in created:  # innermost first; only empty directories we made
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def input_bytes(source: str) -> int:
    """Bytes of the model files at ``source`` (an .onnx file with its data, or a model directory); 0 if unknown."""
    path = Path(source)
    if path.is_file():
        files = [path, *path.parent.glob(path.name + ".data")]
    elif path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in (".onnx", ".data", ".safetensors", ".bin", ".gguf")]
    else:
        return 0
    return sum(p.stat().st_size for p in files if p.is_file())
