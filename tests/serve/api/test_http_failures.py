"""Failure modes of the HTTP app a real model cannot be made to show on demand (a full concurrency limit, a speech
slot taken, an error before or after the stream started, a client that goes away): the real app on a real uvicorn
server, in front of a small gated backend that emits real events and waits where the test says."""

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omni.types import Finished, InvalidRequest, TextDelta
from omni.serve.api.local_server import LocalServer
from omni.serve.api.server import ServerSettings, build_fastapi


class GatedBackend:
    """Emits one real TextDelta, then waits for `release` (a threading.Event) and finishes, or fails when `fail`.
    Records when its stream is closed (cancellation reached the backend)."""

    model_name, voices, max_model_len = "gated", ["Chelsie"], 1024

    def __init__(self):
        self.release, self.closed = threading.Event(), threading.Event()
        self.fail_before, self.fail_after = None, False

    def validate(self, request):
        if request.voice not in self.voices:
            raise InvalidRequest(f"unknown voice {request.voice!r}", "audio.voice")

    async def stream(self, request):
        try:
            if self.fail_before:
                raise self.fail_before
            yield TextDelta("Hi", [1])
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            if self.fail_after:
                raise RuntimeError("replica died mid-stream")
            yield TextDelta(" there", [2])
            yield Finished("stop", prompt_tokens=3, completion_tokens=2)
        finally:
            self.closed.set()


@pytest.fixture()
def gated():
    backend = GatedBackend()
    with LocalServer(build_fastapi(backend, ServerSettings(max_concurrent_requests=1))) as s:
        yield s, backend


def _body(stream):
    return {"model": "gated", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_speech_streams_past_the_limit_wait_their_turn_or_get_503():
    """max_speech_streams=1: while one speech stream runs, a text request is served at once, a speech request (chat
    with audio, or /v1/audio/speech) waits and gets the slot when the stream ends, and one that waits past
    speech_wait_s gets 503 + Retry-After."""
    import concurrent.futures

    backend = GatedBackend()
    settings = ServerSettings(max_concurrent_requests=8, max_speech_streams=1, speech_wait_s=2.0)
    speak = {"modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "wav"}}
    app = build_fastapi(backend, settings)
    with LocalServer(app) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        url = f"{server.url}/v1/chat/completions"
        with httpx.stream("POST", url, json={**_body(True), **speak}, timeout=30) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the speech slot is taken
            t0 = time.monotonic()
            refused = httpx.post(url, json={**_body(False), **speak}, timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["retry-after"] == "1" and time.monotonic() - t0 >= 1.9  # it waited its turn
            t0 = time.monotonic()
            tts = httpx.post(
                f"{server.url}/v1/audio/speech",
                json={"model": "gated", "input": "hello", "voice": "Chelsie"},
                timeout=30,
            )
            assert tts.status_code == 503 and tts.json()["error"]["code"] == "overloaded", tts.text
            assert tts.headers["retry-after"] == "1" and time.monotonic() - t0 >= 1.9  # the same gate
            with httpx.stream("POST", url, json=_body(True), timeout=30) as text:  # text never waits for speech
                assert next(text.iter_lines()).startswith("data: ")
                queued = pool.submit(httpx.post, url, json={**_body(False), **speak}, timeout=30)
                time.sleep(0.3)
                assert not queued.done()  # waiting for the slot
                backend.release.set()
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert queued.result().status_code == 200  # got the slot when the first stream ended
        gate = app.state.routes.speech_gate
        assert gate.active == 0 and gate.waiting == 0  # every slot given back


def test_over_the_concurrency_limit_is_503_then_serves_again(gated):
    server, backend = gated
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_body(True), timeout=30) as first:
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")  # admitted and streaming
        r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(False), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        backend.release.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert (
        httpx.post(f"{server.url}/v1/chat/completions", json=_body(False), timeout=30).json()["choices"][0]["message"][
            "content"
        ]
        == "Hi there"
    )


def test_error_after_the_stream_started_is_an_sse_error_then_done(gated):
    server, backend = gated
    backend.fail_after = True
    backend.release.set()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_body(True), timeout=30) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    err = json.loads(events[-2].removeprefix("data: "))["error"]
    # a server fault: the request id to find it in the log, no internals
    assert err["type"] == "server_error" and "replica died" not in err["message"]
    assert re.fullmatch(
        r"internal server error \(request id [0-9a-f]{32}\); the server log has the details", err["message"]
    ), err["message"]
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="internal server error"):
        list(sdk.chat.completions.create(model="gated", messages=[{"role": "user", "content": "hi"}], stream=True))


@pytest.mark.parametrize(
    "exc, status", [(RuntimeError("backend exploded"), 500), (InvalidRequest("prompt is too long", "messages"), 400)]
)
def test_failure_before_the_first_event_gets_its_status(gated, exc, status):
    server, backend = gated
    backend.fail_before = exc
    for stream in (False, True):  # a stream is not started before the first event: the status is still free
        r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(stream), timeout=30)
        message = r.json()["error"]["message"]
        assert r.status_code == status
        assert (str(exc) in message) == (status == 400)  # the client's error is named; a server fault is not
        if status == 500:
            assert "request id" in message
        assert r.headers["content-type"] == "application/json"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_closes_the_backend_stream(gated, stream):
    server, backend = gated
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_body(True), timeout=30) as r:
            assert next(r.iter_lines()).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=_body(False), timeout=0.5)
    assert backend.closed.wait(10), "the backend stream was not closed after the client left"
    backend.closed.clear()
    backend.release.set()  # the slot was freed: the next request is admitted
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(False), timeout=30)
    assert r.status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert "omni_requests_cancelled_total 1.0" in text and "omni_requests_in_flight 0.0" in text


def test_encoder_batch_hook_shows_in_metrics(gated):
    server, _ = gated
    app = server.server.config.app
    app.state.metrics.observe_encoder_batch("vision", 3)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        for s in fam.samples
    }
    assert samples[("omni_encoder_batch_size_bucket", (("kind", "vision"), ("le", "4.0")))] == 1
    assert samples[("omni_encoder_batch_size_bucket", (("kind", "vision"), ("le", "2.0")))] == 0


def test_a_client_gone_at_a_send_closes_the_body_at_once():
    """The disconnect can surface at a send, while the SSE body waits at a yield (not in its backend): the response
    closes the body right then, so that the body's own cleanup (counting the cancel, closing the backend stream) runs
    at the disconnect, not whenever the suspended generator is collected (the demo's Stop test once saw no cancel)."""
    from types import SimpleNamespace

    from starlette.requests import ClientDisconnect

    from omni.serve.api.common import StreamResponse

    cleaned, released = [], []

    async def body():
        try:
            for chunk in ("data: a\n\n", "data: b\n\n"):
                yield chunk
        except BaseException as e:
            cleaned.append(type(e).__name__)
            raise

    async def release(ok):
        released.append(ok)

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            raise OSError("the client is gone")

    async def receive():
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def main():
        response = StreamResponse(body(), SimpleNamespace(request_id="r", release=release))
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/"}
        with pytest.raises((ClientDisconnect, OSError)):
            await response(scope, receive, send)
        return list(cleaned)

    assert asyncio.run(main()) == ["GeneratorExit"] and released == [False]
