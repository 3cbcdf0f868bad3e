"""The OpenAI-compatible HTTP app: `build_fastapi(backend, settings)` -> FastAPI with GET /health, GET /v1/models,
GET /v1/audio/voices, GET /metrics, POST /v1/chat/completions, POST /v1/audio/speech (serve/api/speech.py) and the
Realtime API, GET /v1/realtime (WebSocket) and POST /v1/realtime/client_secrets (serve/api/realtime.py), POST
/v1/realtime/calls (WebRTC; serve/api/realtime_webrtc.py).

The app holds no module-level state: the backend, settings, admission counter and metrics registry belong to the
app (the Ray ingress builds it in its replica, in `__serve_build_asgi_app__`).

Errors are OpenAI's error body. Client input never gives a 500: bad JSON / fields / media / sampling -> 400,
unknown model -> 404, body or media too large -> 413, missing or wrong key -> 401, over the concurrency limit
-> 503. A failure after a stream has started is sent as an SSE error event followed by `data: [DONE]`.
A client that goes away cancels its request: the backend's iterator is closed on every path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni.types import ChatRequest, Event, SamplingParams
from omni.encoders.sources import MediaLimits, MediaPolicy
from omni.serve.api.admission import Admission, Admitted, SpeechGate
from omni.serve.api.common import (  # noqa: F401 (re-exported)
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    RETRY_AFTER_S,
    HTTPError,
    check_json_nesting,
    classify_error,
)
from omni.serve.api.common import ClientGone as _ClientGone
from omni.serve.api.common import StreamResponse as _StreamResponse
from omni.serve.api.common import error_json as _error_json  # noqa: F401
from omni.serve.api.common import parse_body as _parse
from omni.serve.api.common import read_body as _read_body
from omni.serve.api.convert import SSE_DONE, Completion, ConvertOptions, error_response, sse, to_chat_request
from omni.serve.api.media_cache import MediaCache
from omni.serve.api.metrics import CONTENT_TYPE_LATEST, Metrics
from omni.serve.api.protocol import ChatCompletionRequest, ModelCard, ModelList
from omni.serve.api.realtime import mount_realtime
from omni.serve.api.realtime_events import RealtimeLimits
from omni.serve.api.realtime_webrtc import mount_webrtc
from omni.serve.api.speech import speech

__all__ = ["Backend", "ServerSettings", "HTTPError", "build_fastapi", "classify_error"]

log = logging.getLogger("omni.serve.api.server")


class Backend(Protocol):
    """What the HTTP layer drives: omni.serve.compose.Composition (the in-process Pipeline, or the Ray app's
    handle-backed stages)."""

    @property
    def model_name(self) -> str: ...

    @property
    def voices(self) -> list[str]: ...

    @property
    def max_model_len(self) -> int: ...  # prompt + max_tokens limit

    def validate(self, request: ChatRequest) -> object:
        """The one check: raises InvalidRequest, else returns the checked request (compose.CheckedRequest)."""
        ...

    def stream(self, checked) -> AsyncIterator[Event]:
        """The events of what validate returned; aclose() cancels the request."""
        ...


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: Optional[str] = None  # the name /v1/models lists and requests must use; None: backend's name
    api_key: Optional[str] = None  # Bearer key required on every route but /health; None: open
    max_body_bytes: int = 100 * 2**20  # request bodies past this get 413 (base64 media counted as sent)
    max_tokens: Optional[int] = None  # per-request max_tokens limit (400 past it); None: backend.max_model_len
    default_max_tokens: int = 256  # when a request gives no max_tokens (never above the limit)
    default_sampling: SamplingParams = SamplingParams()  # the Thinker's defaults (the checkpoint's generation config)
    default_speech_tokens: int = 2048  # the Talker's max codec tokens unless sampling_params_list[1] sets them
    max_concurrent_requests: int = 64  # chat completions in flight per app (replica); 503 past it
    max_speech_streams: Optional[int] = None  # speech streams in flight (chat with audio, /v1/audio/speech); more
    #                                           wait their turn (None: no limit)
    speech_wait_s: float = 30.0  # how long one waits for a speech slot before its 503
    media_limits: MediaLimits = MediaLimits()  # per media item: bytes, pixels, seconds, frames
    media_cache_bytes: int = 128 * 2**20  # decoded inline media kept by content hash (serve/api/media_cache.py); 0: off
    media_policy: MediaPolicy = MediaPolicy()  # local paths / file:// only under its allowed_local_media_path; http(s)
    api_dialect: str = "openai"  # response shapes: "openai", or "vllm-omni" (its example clients work unchanged)
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models `created`
    realtime: RealtimeLimits = RealtimeLimits()  # /v1/realtime sessions: length, buffered audio, event rate and size


def _log_failure(err: HTTPError, what: str, rid: str, exc: BaseException) -> None:
    """A 500 with its traceback; a 503 (a replica gone, the client retries) in one line; client errors not at all."""
    if err.status == 503:
        log.warning("%s %s: %s (%s)", what, rid, err.message, type(exc.__cause__ or exc).__name__)
    elif err.status >= 500:
        log.exception("%s %s failed", what, rid)


def _check_auth(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise HTTPError(401, "incorrect API key", code="invalid_api_key")


async def _watch_disconnect(request: Request, on_gone: Callable[[], None]) -> None:
    """Waits for the client's http.disconnect (the body has been read) and calls `on_gone`."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                on_gone()
                return
            await asyncio.sleep(0.05)
    except Exception:  # a server whose receive() cannot be polled here: no watching, never an error
        return


async def _until_disconnect(request: Request, awaitable):
    """Awaits in the current task (the backend's iterator stays in one task); raises _ClientGone if the client
    disconnects first."""
    task, gone = asyncio.current_task(), []

    def cancel():
        gone.append(True)
        task.cancel()

    watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
    try:
        return await awaitable
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise _ClientGone() from None
        raise
    finally:
        watcher.cancel()


async def _sse_body(first: Event, comp: Completion, admitted: Admitted, metrics: Metrics) -> AsyncIterator[str]:
    """The SSE stream after the first event has arrived: role chunk, content/audio deltas, finish chunk, usage
    chunk, [DONE]. An error is one `data: {"error": ...}` event, then [DONE]."""
    ok, events = False, admitted.events
    try:
        yield sse(comp.role_chunk())
        ev = first
        while True:
            admitted.track.on_event(ev)
            for chunk in comp.feed(ev):
                yield sse(chunk)
            if comp.done:
                break
            try:
                ev = await events.__anext__()
            except StopAsyncIteration:
                break
        for chunk in comp.final_chunks():
            yield sse(chunk)
        ok = True
    except Exception as e:  # noqa: BLE001 - reported to the client inside the stream
        err = classify_error(e, comp.request_id)
        _log_failure(err, "stream", comp.id, e)
        metrics.stream_errors.inc()
        yield sse(error_response(err.status, err.message, err.param, err.code))
    except BaseException:  # cancelled: the client went away
        metrics.cancelled.inc()
        raise
    finally:
        await admitted.release(ok)
    yield SSE_DONE


class _Routes:
    """The app's state and its handlers, each a named step: admit, convert, then a streamed or a whole response."""

    def __init__(self, backend: Backend, settings: ServerSettings, metrics: Metrics):
        self.backend, self.settings, self.metrics = backend, settings, metrics
        self.admission = Admission(settings.max_concurrent_requests)
        self.speech_gate = SpeechGate(settings.max_speech_streams, settings.speech_wait_s)
        self.draining = False  # set by drain(): shutting down, refuse new requests
        self.served_name = settings.served_model_name or backend.model_name
        limit = min(settings.max_tokens or backend.max_model_len, backend.max_model_len)
        self.convert_options = ConvertOptions(
            max_tokens_limit=limit,
            default_max_tokens=settings.default_max_tokens,
            default_sampling=settings.default_sampling,
            default_speech_tokens=settings.default_speech_tokens,
            media_limits=settings.media_limits,
            media_policy=settings.media_policy,
            voices=tuple(backend.voices),
            media_cache=MediaCache(settings.media_cache_bytes),
        )

    def models(self, request: Request) -> dict:
        _check_auth(request, self.settings)
        b = self.backend
        card = ModelCard(
            id=self.served_name,
            created=self.settings.created,
            root=b.model_name,
            max_model_len=b.max_model_len,
            speaks=bool(b.voices),
            voices=list(b.voices),
        )
        return ModelList(data=[card]).model_dump()

    def voices(self, request: Request) -> dict:
        """This model's voices ([] without speech output)."""
        _check_auth(request, self.settings)
        return {"object": "list", "model": self.served_name, "voices": list(self.backend.voices)}

    def drain(self) -> int:
        """Stop accepting (new requests get 503, /health says draining); -> requests still in flight."""
        self.draining = True
        return self.admission.active

    def admit(self, request: Request, speech: bool = False) -> Admitted:
        """Auth, then a concurrency slot; raises HTTPError (401, 503)."""
        _check_auth(request, self.settings)
        if self.draining:
            raise HTTPError(503, "server is shutting down; retry on another replica", code="shutting_down")
        if not self.admission.try_acquire():
            raise HTTPError(
                503,
                f"server is at its limit of {self.admission.limit} concurrent requests; retry later",
                code="overloaded",
            )
        return Admitted(self.admission, self.metrics.track(speech))

    async def speech_slot(self, request: Request, admitted: Admitted) -> None:
        """Wait for one of the speech streams' slots (released with `admitted`); HTTPError 503 past speech_wait_s."""
        if not await _until_disconnect(request, self.speech_gate.acquire()):
            raise HTTPError(
                503,
                f"all {self.speech_gate.limit} speech streams of this server are busy; retry later",
                code="overloaded",
            )
        admitted.on_release = self.speech_gate.release

    async def _convert(self, request: Request, request_id: str) -> tuple[ChatCompletionRequest, ChatRequest, object]:
        """Body -> the wire request -> a ChatRequest (media decoded off the event loop) and the backend's checked
        request."""
        req = _parse(await _read_body(request, self.settings.max_body_bytes))
        if req.model and req.model != self.served_name:
            raise HTTPError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        t_media = time.perf_counter()
        chat = await _until_disconnect(
            request, run_in_threadpool(to_chat_request, req, request_id, self.convert_options)
        )
        self.metrics.observe_stage("ingress_media", time.perf_counter() - t_media)
        return req, chat, self.backend.validate(chat)

    async def _stream_response(self, request: Request, comp: Completion, admitted: Admitted) -> Response:
        try:  # the first event before the headers: an InvalidRequest raised late still gets its 400
            first = await _until_disconnect(request, admitted.events.__anext__())
        except StopAsyncIteration:
            raise RuntimeError("the backend stream ended without any event") from None
        self.metrics.count(200)
        return _StreamResponse(_sse_body(first, comp, admitted, self.metrics), admitted)

    async def _whole_response(self, request: Request, comp: Completion, admitted: Admitted) -> Response:
        async def collect():
            async for ev in admitted.events:
                admitted.track.on_event(ev)
                comp.feed(ev)
                if comp.done:
                    break

        await _until_disconnect(request, collect())
        response = comp.response()
        await admitted.release(ok=True)
        self.metrics.count(200)
        return JSONResponse(response.model_dump())

    async def chat_completions(self, request: Request) -> Response:
        try:
            admitted = self.admit(request)
        except HTTPError as e:
            self.metrics.count(e.status)
            return _error_json(e)
        request_id = admitted.request_id = uuid.uuid4().hex
        try:
            req, chat, checked = await self._convert(request, request_id)
            comp = Completion(
                chat.request_id,
                self.served_name,
                speak=chat.speak,
                audio_format=req.audio.format if req.audio else "wav",
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
                stop=req.stop_strings,
                dialect=self.settings.api_dialect,
            )
            if chat.speak:
                await self.speech_slot(request, admitted)
            admitted.events = self.backend.stream(checked)
            if req.stream:
                return await self._stream_response(request, comp, admitted)
            return await self._whole_response(request, comp, admitted)
        except _ClientGone:
            await admitted.release(ok=False)
            self.metrics.cancelled.inc()
            self.metrics.count(499)  # nginx's "client closed request"; nobody reads this response
            return Response(status_code=499)
        except BaseException as e:
            await admitted.release(ok=False)
            if not isinstance(e, Exception):
                raise
            err = classify_error(e, request_id)
            _log_failure(err, "request", request_id, e)
            self.metrics.count(err.status)
            return _error_json(err)


def build_fastapi(
    backend: Backend, settings: ServerSettings = ServerSettings(), metrics: Optional[Metrics] = None
) -> FastAPI:
    """The app over `backend`; `metrics`: the registry to record into (a fresh one by default)."""
    app = FastAPI(title="omni", docs_url=None, redoc_url=None, openapi_url=None)
    routes = _Routes(backend, settings, metrics or Metrics())
    app.state.settings, app.state.metrics, app.state.routes = settings, routes.metrics, routes
    if callable(getattr(backend, "stage_stats", None)):  # the in-process pipeline: its stages' loops are here
        routes.metrics.watch_stages(backend.stage_stats)
    if getattr(backend, "encoder_cache", None) is not None:  # serve/encoder_cache.py: hits, misses, bytes
        routes.metrics.watch_encoder_cache(backend.encoder_cache.stats)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return _error_json(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        return _error_json(HTTPError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_json(HTTPError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        request_id = uuid.uuid4().hex
        log.exception("unhandled error on %s (request id %s)", request.url.path, request_id)
        return _error_json(classify_error(exc, request_id))

    @app.get("/health")
    async def health():
        if routes.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        return routes.models(request)

    @app.get("/v1/audio/voices")
    async def voices(request: Request):
        return routes.voices(request)

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        return await speech(routes, request)

    @app.get("/metrics")
    async def metrics_route(request: Request):
        _check_auth(request, settings)
        return Response(routes.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await routes.chat_completions(request)

    secrets = mount_realtime(app, routes, _check_auth)  # GET /v1/realtime (WebSocket), POST .../client_secrets
    mount_webrtc(app, routes, secrets)  # POST /v1/realtime/calls (WebRTC)
    return app
