"""A real uvicorn server for the HTTP tests (a helper module, not tests)."""

import asyncio
import socket
import threading
import time

import uvicorn

__all__ = ["Server"]


class Server:
    """uvicorn on 127.0.0.1:<free port> in a background thread, with its own event loop."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        pending = asyncio.all_tasks(self.loop)  # the backend's background loops: stop them with the server
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def call(self, coro, timeout=120):
        """Run a coroutine on the server's loop (where the backend lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
