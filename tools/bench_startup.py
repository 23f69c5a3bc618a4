"""How long `rptq-onnx` takes to answer before doing any work: --help and a usage error.

Runs each command with ``sys.executable -m rptq_onnx`` (the code of this checkout): the first run
is reported as "cold" (the first start after a change; a truly cold page cache needs a reboot), then
the median of ``--repeat`` further runs as "warm". Each command must answer in under 2 s.

    python -m rptq_onnx.tools.bench_startup [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "rptq-onnx --help": ["--help"],
    "rptq-onnx compile --help": ["compile", "--help"],
    "rptq-onnx compile --wbits abc": ["compile", "-o", "unused-out", "--wbits", "abc"],
    "rptq-onnx eval (missing MODEL)": ["eval"],
}
LIMIT_S = 2.0


def time_once(args: list[str], cwd: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rptq_onnx", *args], cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="warm runs per command (default 5)")
    args = parser.parse_args(argv)
    cwd = Path(__file__).resolve().parent.parent  # a checkout's root, so -m imports its code
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("| command | exit | cold s | warm s (median of %d) | < %.0f s |" % (args.repeat, LIMIT_S))
    print("|---|---:|---:|---:|---|")
    ok = True
    for label, cmd in COMMANDS.items():
        cold, rc = time_once(cmd, cwd)
        warm = statistics.median(time_once(cmd, cwd)[0] for _ in range(args.repeat))
        passed = max(cold, warm) < LIMIT_S
        ok &= passed
        print(f"| `{label}` | {rc} | {cold:.2f} | {warm:.2f} | {'yes' if passed else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
