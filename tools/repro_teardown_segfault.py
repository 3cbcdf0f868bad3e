"""Reproducer for the teardown crash that tests/conftest.py's early exit (os._exit after the last report) masks.

Once in a full `make test` run (448 passed, 2026-12-02) the pytest process died with SIGSEGV (make saw 139) after its
summary was printed: in the interpreter's teardown, where the finalizers of what the session leaves behind run (Ray
driver connections and their gRPC threads, torch's thread pools, uvicorn / gradio worker threads). Not reproduced
since on single modules (tests/serve/cluster/test_errors.py, tests/omni/test_engine.py: exit 0 without the early exit).

This runs pytest on the given test files (default: the modules that start Ray in this process) with the early exit
off (OMNI_TEST_HARD_EXIT=0) and Python's faulthandler on through the interpreter's teardown (-X faulthandler), N
times, and prints each run's exit status and, for a run killed by a signal, the tail of its output (faulthandler's
dump names the thread and the frames that crashed). Exit status 1 when some run died by a signal.

    .venv/bin/python tools/repro_teardown_segfault.py [--runs 3] [tests/serve/cluster/test_two_nodes.py ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_MODULES = [
    "tests/serve/cluster/test_two_nodes.py",
    "tests/serve/cluster/test_caption_cluster.py",
    "tests/serve/cluster/test_qwen3_app.py",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="*", default=RAY_MODULES)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    env = {**os.environ, "OMNI_TEST_HARD_EXIT": "0", "HF_HUB_OFFLINE": "1"}
    crashed = 0
    for i in range(args.runs):
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        print(f"run {i + 1}/{args.runs}: {how}", flush=True)
        if rc < 0 or rc >= 128:
            crashed += 1
            print((proc.stdout + proc.stderr)[-6000:], flush=True)
    print(f"{crashed} of {args.runs} runs died by a signal")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
