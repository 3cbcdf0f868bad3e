"""`omni serve` in a subprocess, for what drives the app from outside: `omni bench load --model ...` and the tests.

    with ServeProcess.start(["--model", "tiny", "--config", "tiny"], log_path) as server:
        server.url            # http://127.0.0.1:<free port>
        server.connect_ray()  # this process joins the server's Ray (replica handles, omni.serve.cluster.replicas)

The server runs its own local Ray; `omni serve` logs that Ray's address before its ready line, and `connect_ray`
uses it (`ray.init(address="auto")` is ambiguous when other Ray instances run on the machine). `stop()` sends SIGTERM
(the server drains, then exits 0) and kills it only past the timeout.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

__all__ = ["ServeProcess", "ServeStartError", "connect_ray", "free_port"]

_RAY_ADDRESS = re.compile(r"^ray address: (\S+)$", re.M)
_READY = "ready in"  # the start of `omni serve`'s ready line


class ServeStartError(RuntimeError):
    """`omni serve` exited or did not get ready in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_auth_like_auto() -> None:
    """A new local Ray turns token authentication on unless RAY_AUTH_MODE says otherwise (Ray 2.60), and
    `ray.init(address="auto")` follows it when a token exists (~/.ray/auth_token), but an explicit address never does:
    do what "auto" does (Ray's own function; this process's cached config is refreshed with it)."""
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect_ray(address: str) -> None:
    """`ray.init(address)` as a quiet driver, with the token authentication a local `omni serve` uses; a no-op when
    this process is already connected to that Ray. Connected to another one (a test module before left its Ray up),
    it disconnects first, and forgets that Ray's Serve controller: deployment handles got after this must reach this
    Ray's app (a stale controller answers no call, and handle calls then wait forever)."""
    import ray
    from ray.serve import context as serve_context

    if ray.is_initialized():
        if ray.get_runtime_context().gcs_address == address:
            return
        ray.shutdown()
    serve_context._set_global_client(None)
    _token_auth_like_auto()
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    url: str  # http://host:port, no trailing slash
    ray_address: str  # the server's Ray (GCS) address
    log_path: Path  # the server's stdout and stderr
    _log: IO  # the open log file, closed by stop()

    @classmethod
    def start(cls, args: Sequence[str], log_path: Path, port: Optional[int] = None, timeout_s: float = 420,
              cwd: Optional[str] = None, env: Optional[dict] = None) -> "ServeProcess":
        """`omni serve ARGS --port PORT` (a free port when None); returns once it logged its ready line. Raises
        ServeStartError when it exits first or takes more than `timeout_s`."""
        port = port or free_port()
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
        cmd = [sys.executable, "-m", "omni.serve.cli", "serve", *args, "--port", str(port)]
        environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray ...
        environ.update(env or {})  # ... unless `env` names a cluster
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=environ)
        t0 = time.monotonic()
        try:
            while True:
                text = log_path.read_text(errors="replace")
                if _READY in text:
                    break
                if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                    why = f"exited with {proc.returncode}" if proc.returncode is not None else "did not get ready"
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(30)
                    log.close()
                    raise ServeStartError(f"omni serve {why} after {time.monotonic() - t0:.0f} s:\n{text[-4000:]}")
                time.sleep(0.5)
        except KeyboardInterrupt:  # Ctrl-C while it starts: SIGTERM stops it and its Ray, no orphaned server
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            raise
        found = _RAY_ADDRESS.search(text)
        return cls(proc, f"http://127.0.0.1:{port}", found.group(1) if found else "", log_path, log)

    def connect_ray(self) -> None:
        """This process joins the server's Ray as a driver (a no-op when it already is one)."""
        connect_ray(self.ray_address)

    def stop(self, timeout_s: float = 90) -> Optional[int]:
        """SIGTERM (drain, then exit), SIGKILL past `timeout_s`; disconnects this process's Ray first. -> exit code."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
