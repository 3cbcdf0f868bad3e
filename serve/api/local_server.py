"""The HTTP app on uvicorn at 127.0.0.1:<free port>, in a thread of this process with its own event loop: for the
benchmarks that serve the in-process pipeline themselves (serve/bench/realtime.py) and for tests.

    with LocalServer(build_fastapi(pipeline)) as server:
        url = server.url  # http://127.0.0.1:<port>
        server.call(pipeline.run(chat))  # a coroutine on the server's loop, where the backend's loops live
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

__all__ = ["LocalServer"]


class LocalServer:
    def __init__(self, app, start_timeout_s: float = 60.0):
        import uvicorn

        # the socket stays bound from here and uvicorn serves on it: no other process can take the port between
        # choosing it and listening on it
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        finally:
            pending = asyncio.all_tasks(self.loop)  # the backend's background loops: they stop with the server
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()
            self.sock.close()

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:  # uvicorn sets it once the socket listens; nothing to wait on but a flag
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop (where the backend lives) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
