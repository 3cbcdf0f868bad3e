"""`omni serve` as a subprocess (its own local Ray), shared by the Serve test modules: one server per module, this test
process joined to that server's Ray for handles and replica actors (omni.serve.cluster.process.ServeProcess)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def omni_serve(tmp_path_factory):
    """`omni_serve(*args, connect=True) -> ServeProcess`: start `omni serve ARGS` on a free port, wait for its ready
    line and (with connect) join its Ray; every server the module started is stopped (SIGTERM) after the module."""
    from omni.serve.cluster.process import ServeProcess, ServeStartError

    started = []

    def start(*args: str, connect: bool = True) -> ServeProcess:
        try:
            server = ServeProcess.start(list(args), tmp_path_factory.mktemp("serve") / "serve.log", cwd=str(REPO))
        except ServeStartError as exc:
            pytest.fail(str(exc))
        started.append(server)
        if connect:
            server.connect_ray()
        return server

    yield start
    for server in started:
        server.stop()
