"""`omni serve` as a child process: what `omni demo` starts when it has no `--api-url`, and what tests start.

    with ServeProcess(["--model", "tiny"], log_path="serve.log") as server:   # blocks until the app is ready
        client = openai.OpenAI(base_url=server.api_url, api_key="unused")

The child runs in its own session (process group), so a Ctrl-C in the parent's terminal reaches only the parent,
which stops the child: SIGTERM (the server drains, shuts down Serve and Ray, exits 0), then SIGKILL to the whole
group (Ray's workers included) if it is still there after `grace_s`. This module imports no ray.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["ServeProcess", "free_port", "READY_LINE"]

READY_LINE = "ready in "  # what run_server prints (stderr) once serve.run has returned: every deployment is up


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServeProcess:
    """One `omni serve` child on host:port (a free port when None), its output in `log_path` (a temp file when None)."""

    def __init__(self, args: Sequence[str] = ("--model", "tiny"), log_path: Optional[str | os.PathLike] = None,
                 host: str = "127.0.0.1", port: Optional[int] = None, cwd: Optional[str | os.PathLike] = None):
        self.args, self.host, self.port = list(args), host, port or free_port(host)
        if log_path is None:
            import tempfile

            log_path = Path(tempfile.mkdtemp(prefix="omni-serve-")) / "serve.log"
        self.log_path, self.cwd = Path(log_path), cwd
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:  # http://host:port
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:  # the OpenAI SDK's base_url
        return self.url + "/v1"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = 420.0) -> "ServeProcess":
        """Starts the child and waits for run_server's ready line and a 200 from /health; raises RuntimeError (with
        the log's tail) if the child exits or the time runs out first."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "omni.serve.cli", "serve", *self.args, "--host", self.host,
                 "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, start_new_session=True)
        deadline = time.time() + timeout_s
        while not (READY_LINE in self.log_tail(10 ** 6) and self._healthy()):
            if self.proc.poll() is not None or time.time() > deadline:
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                       else f"was not ready after {timeout_s:.0f} s")
                self.stop(grace_s=5)
                raise RuntimeError(f"omni serve {why}; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            time.sleep(0.5)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, grace_s: float = 60.0) -> Optional[int]:
        """SIGTERM, wait up to grace_s, then SIGKILL the child's process group. -> the child's exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (Ray processes of a child that was killed or hung)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
