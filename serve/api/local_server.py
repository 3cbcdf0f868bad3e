"""The HTTP app on uvicorn at 127.0.0.1:<free port>, in a thread of this process with its own event loop: for the
benchmarks that serve the in-process pipeline themselves (serve/bench/realtime.py) and for tests.

    with LocalServer(build_fastapi(pipeline)) as server:
        url = f"http://127.0.0.1:{server.port}"
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

__all__ = ["LocalServer"]


class LocalServer:
    def __init__(self, app, start_timeout_s: float = 60.0):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:  # uvicorn sets it once the socket listens; nothing to wait on but a flag
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
