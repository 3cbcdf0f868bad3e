"""Graceful shutdown of `omni serve` (the server test_app and test_app_faults used, last: conftest.SharedServer,
--drain-timeout 60): on SIGTERM it refuses new requests (503 + Retry-After), lets the stream in
flight finish, shuts Serve and Ray down and exits 0 with one log line, no crash dump."""

import json
import signal
import threading
import time

import httpx
import pytest

from .conftest import APP_KEY

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {APP_KEY}"}


def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_app):
    server = tiny_app.take()  # this test stops it
    proc, log_path = server.proc, server.log_path
    try:
        url = server.url
        body = {
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "stream": True,
            "max_tokens": 400,
            "temperature": 0,
        }
        events, started = [], threading.Event()

        def stream():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120, headers=AUTH) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        offset = log_path.stat().st_size  # what the server logged before (earlier modules' replica kills) is theirs
        proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(40):  # new requests are refused while the stream is still running
            time.sleep(0.25)
            r = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=30,
                headers=AUTH,
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            if r.status_code == 503:
                refused = r
                break
        assert refused is not None, "no 503 while draining"
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["code"] == "shutting_down"
        assert t.is_alive() or events[-1] == "data: [DONE]"
        t.join(120)
        assert events[-1] == "data: [DONE]"  # the stream in flight finished whole
        finish = [
            json.loads(e[6:])["choices"][0]["finish_reason"]
            for e in events[:-1]
            if e.startswith("data: {") and json.loads(e[6:])["choices"]
        ]
        assert finish[-1] in ("stop", "length")
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    out = log_path.read_bytes()[offset:].decode(errors="replace")
    assert "*** SIGTERM received" not in out and "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("omni serve: SIGTERM received: drained")]
    assert len(lines) == 1 and lines[0].endswith("; stopped"), out[-2000:]
