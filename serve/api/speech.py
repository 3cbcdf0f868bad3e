"""POST /v1/audio/speech (OpenAI's text-to-speech): the omni model speaks `input` verbatim.

The reply is forced to `input` (serve/api/convert.py `to_speech_request`): the Thinker reads it in one prefill and
hands every hidden state to the Talker at once, so speech starts after the Talker's first codes, never waiting for
text decoding. The answer streams as it is produced:
    stream_format "audio": the encoded bytes (wav, pcm, mp3, opus, flac, aac) in a chunked response
    stream_format "sse":   `data: {"type": "speech.audio.delta", "audio": <base64>}` ... then
                           `data: {"type": "speech.audio.done", "usage": {...}}`
Errors before the first audio are JSON error bodies with their status; after it, the stream ends (sse: an error
event).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from omni.types import AudioChunk, Event, Finished
from omni.serve.api.audio_io import AUDIO_FORMATS, AudioStreamEncoder
from omni.serve.api.common import (
    ClientGone,
    HTTPError,
    StreamResponse,
    classify_error,
    error_json,
    parse_body,
    read_body,
)
from omni.serve.api.convert import error_response, to_speech_request
from omni.serve.api.protocol import SpeechRequest

__all__ = ["speech"]

log = logging.getLogger("omni.serve.api.speech")


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _body(
    first: Event, events: AsyncIterator[Event], req: SpeechRequest, admitted, metrics
) -> AsyncIterator[bytes]:
    """Encoded audio (or SSE events) from the first event on; releases the request however it ends."""
    enc = AudioStreamEncoder(req.response_format)
    sse, ok, fin = req.stream_format == "sse", False, None

    def out(raw: bytes) -> bytes:
        if not raw:
            return b""
        return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(raw).decode("ascii")}) if sse else raw

    try:
        ev = first
        while True:
            admitted.track.on_event(ev)
            if isinstance(ev, AudioChunk) and len(ev.pcm):
                if chunk := out(enc.feed(ev.pcm)):
                    yield chunk
            elif isinstance(ev, Finished):
                fin = ev
            try:
                ev = await events.__anext__()
            except StopAsyncIteration:
                break
        if chunk := out(enc.close()):
            yield chunk
        if sse:
            n_in = fin.prompt_tokens + fin.completion_tokens if fin else 0
            n_out = fin.codec_tokens if fin else 0
            yield _sse(
                {
                    "type": "speech.audio.done",
                    "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out},
                }
            )
        ok = True
    except Exception as e:  # noqa: BLE001 - after the headers: an error event (sse) or a cut stream (audio)
        err = classify_error(e, admitted.request_id)
        if err.status >= 500:
            log.exception("speech %s failed", admitted.request_id)
        metrics.stream_errors.inc()
        if sse:
            yield _sse(error_response(err.status, err.message, err.param, err.code).model_dump())
    finally:
        await admitted.release(ok)


async def speech(routes, request: Request) -> Response:
    """The handler, over server.py's `_Routes` (auth, admission, parsing, the backend)."""
    metrics = routes.metrics
    try:
        admitted = routes.admit(request, speech=True)
    except HTTPError as e:
        metrics.speech_requests.labels(status=str(e.status)).inc()
        return error_json(e)
    admitted.request_id = uuid.uuid4().hex
    try:
        req = parse_body(await read_body(request, routes.settings.max_body_bytes), SpeechRequest)
        if req.model and req.model != routes.served_name:
            raise HTTPError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        chat = await run_in_threadpool(to_speech_request, req, admitted.request_id, routes.convert_options)
        checked = routes.backend.validate(chat)
        await routes.speech_slot(request, admitted)  # the speech streams' gate, shared with chat completions
        t0 = time.perf_counter()
        admitted.events = events = routes.backend.stream(checked)
        try:  # the first event before the headers: a late 4xx still gets its status
            first = await events.__anext__()
        except StopAsyncIteration:
            raise RuntimeError("the backend stream ended without any event") from None
        metrics.observe_stage("speech_first_event", time.perf_counter() - t0)
        metrics.speech_requests.labels(status="200").inc()
        media_type = "text/event-stream" if req.stream_format == "sse" else AUDIO_FORMATS[req.response_format][0]
        return StreamResponse(_body(first, events, req, admitted, metrics), admitted, media_type)
    except ClientGone:  # it went away while waiting for a speech slot
        await admitted.release(ok=False)
        metrics.cancelled.inc()
        metrics.speech_requests.labels(status="499").inc()
        return Response(status_code=499)
    except BaseException as e:
        await admitted.release(ok=False)
        if not isinstance(e, Exception):
            raise
        err = classify_error(e, admitted.request_id)
        if err.status >= 500:
            log.exception("speech %s failed", admitted.request_id)
        metrics.speech_requests.labels(status=str(err.status)).inc()
        return error_json(err)
