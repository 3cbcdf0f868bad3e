"""`omni serve` as a child process: what `omni demo` starts when it has no `--api-url`, what `omni bench` / `omni
bench load --model ...` start, and what the tests start.

    with ServeProcess(["--model", "tiny", "--config", "tiny"], log_path) as server:   # blocks until it is ready
        client = openai.OpenAI(base_url=server.api_url, api_key="unused")
        server.connect_ray()  # this process joins the server's Ray (replica handles, omni.serve.cluster.replicas)

The child runs its own local Ray (RAY_ADDRESS is not passed on unless `env` names a cluster) and logs that Ray's
address before its ready line; `connect_ray` uses it (`ray.init(address="auto")` is ambiguous when other Ray instances
run on the machine). The child runs in its own session (process group), so a Ctrl-C in the parent's terminal reaches
only the parent, which stops the child: SIGTERM (the server drains, shuts down Serve and Ray, exits 0), then SIGKILL to
the whole group (Ray's workers included) if it is still there after `grace_s`. This module imports ray only in
`connect_ray` and, when this process is connected, in `stop`.
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
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

__all__ = ["ServeProcess", "ServeStartError", "connect_ray", "free_port", "READY_LINE"]

READY_LINE = "ready in "  # what run_server prints (stderr) once serve.run has returned: every deployment is up
_RAY_ADDRESS = re.compile(r"^ray address: (\S+)$", re.M)


class ServeStartError(RuntimeError):
    """`omni serve` exited or did not get ready in time; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _token_auth_like_auto() -> None:
    """A new local Ray turns token authentication on unless RAY_AUTH_MODE says otherwise (Ray 2.60), and
    `ray.init(address="auto")` follows it when a token exists (~/.ray/auth_token), but an explicit address never does:
    do what "auto" does (Ray's own function; this process's cached config is refreshed with it)."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
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


class ServeProcess:
    """One `omni serve` child on host:port (a free port when None), its output in `log_path` (a temp file when None);
    `env` is added to its environment."""

    def __init__(
        self,
        args: Sequence[str] = ("--model", "tiny"),
        log_path: Optional[str | os.PathLike] = None,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        cwd: Optional[str | os.PathLike] = None,
        env: Optional[dict] = None,
    ):
        self.args, self.host, self.port = list(args), host, port or free_port(host)
        if log_path is None:
            import tempfile

            log_path = Path(tempfile.mkdtemp(prefix="omni-serve-")) / "serve.log"
        self.log_path, self.cwd, self.env = Path(log_path), cwd, env
        self.proc: Optional[subprocess.Popen] = None
        self.ray_address = ""  # the server's Ray (GCS) address, once it is ready

    @property
    def url(self) -> str:  # http://host:port, no trailing slash
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:  # the OpenAI SDK's base_url
        return self.url + "/v1"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = 420.0) -> ServeProcess:
        """Starts the child and waits for run_server's ready line and a 200 from /health; raises ServeStartError (with
        the log's tail) if the child exits or the time runs out first. A Ctrl-C while it starts stops it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray ...
        environ.update(self.env or {})  # ... unless `env` names a cluster
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "omni.serve.cli",
                    "serve",
                    *self.args,
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=environ,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        try:
            while not (READY_LINE in self.log_tail(10**7) and self._healthy()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    why = (
                        f"exited with {self.proc.returncode}"
                        if self.proc.poll() is not None
                        else f"was not ready after {timeout_s:.0f} s"
                    )
                    self.stop(grace_s=5)
                    raise ServeStartError(f"omni serve {why}; its log ({self.log_path}) ends with:\n{self.log_tail()}")
                time.sleep(0.5)
        except KeyboardInterrupt:  # no orphaned server
            self.stop()
            raise
        found = _RAY_ADDRESS.search(self.log_tail(10**7))
        self.ray_address = found.group(1) if found else ""
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def connect_ray(self) -> None:
        """This process joins the server's Ray as a driver (a no-op when it already is one)."""
        connect_ray(self.ray_address)

    def stop(self, grace_s: float = 90.0) -> Optional[int]:
        """Disconnects this process's Ray (when connected), then SIGTERM, waits up to grace_s, and SIGKILLs the
        child's process group. -> the child's exit code."""
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
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

    def __enter__(self) -> ServeProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
