"""The OpenAI-compatible HTTP app: `build_fastapi(backend, settings)` -> FastAPI with GET /health, GET /v1/models,
GET /v1/audio/voices, GET /metrics and POST /v1/chat/completions.

The app holds no module-level state: settings, the backend, the admission counter and the metrics registry live
on `app.state`, so the same app object serves under uvicorn and as a Ray Serve ingress (`@serve.ingress(app)`
pickles the app: give it a backend factory, or build the app in `__serve_build_asgi_app__`).

Errors are OpenAI's error body. Client input never gives a 500: bad JSON / fields / media / sampling -> 400,
unknown model -> 404, body or media too large -> 413, missing or wrong key -> 401, over the concurrency limit
-> 503. A failure after a stream has started is sent as an SSE error event followed by `data: [DONE]`.
A client that goes away cancels its request: the backend's iterator is closed on every path.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional, Protocol, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni.types import ChatRequest, Event, InvalidRequest
from omni.serve.api.metrics import CONTENT_TYPE_LATEST, Metrics, RequestTrack
from omni.serve.api.convert import SSE_DONE, Completion, ConvertOptions, error_response, sse, to_chat_request
from omni.serve.api.protocol import ChatCompletionRequest, ModelCard, ModelList

__all__ = ["Backend", "ServerSettings", "HTTPError", "build_fastapi", "classify_error"]

log = logging.getLogger("omni.serve.api.server")


class Backend(Protocol):
    """What the HTTP layer drives: the in-process Pipeline, or the Ray app's handle-backed ingress."""
    model_name: str
    voices: list[str]
    max_model_len: int  # prompt + max_tokens limit

    def validate(self, request: ChatRequest) -> None: ...  # raises InvalidRequest

    def stream(self, request: ChatRequest) -> AsyncIterator[Event]: ...  # aclose() cancels the request


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: Optional[str] = None  # the name /v1/models lists and requests must use; None: backend's name
    api_key: Optional[str] = None  # Bearer key required on every route but /health; None: open
    max_body_bytes: int = 100 * 2**20  # request bodies past this get 413 (base64 media counted as sent)
    max_tokens: Optional[int] = None  # per-request max_tokens limit (400 past it); None: backend.max_model_len
    default_max_tokens: int = 256  # when a request gives no max_tokens (never above the limit)
    default_sampling: Optional[object] = None  # omni.types.SamplingParams: the Thinker's defaults; None: greedy
    default_speech_tokens: int = 2048  # the Talker's max codec tokens unless sampling_params_list[1] sets them
    max_concurrent_requests: int = 64  # chat completions in flight per app (replica); 503 past it
    media_limits: Optional[object] = None  # omni.encoders.media.MediaLimits; None: its defaults
    media_policy: Optional[object] = None  # omni.encoders.media.MediaPolicy; None: its defaults
    allowed_local_media_path: Optional[str] = None  # local paths / file:// allowed under this directory only
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models `created`


class HTTPError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _ClientGone(Exception):
    pass


def _loc(loc) -> str:
    """pydantic's ('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _from_validation(e: ValidationError) -> HTTPError:
    errors = e.errors()
    parts = []
    for err in errors[:5]:
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{_loc(err['loc'])}: {msg}" if err.get("loc") else msg)
    param = _loc(errors[0]["loc"]) if errors and errors[0].get("loc") else None
    return HTTPError(400, "invalid request: " + "; ".join(parts), param, "invalid_request")


def classify_error(exc: BaseException) -> HTTPError:
    """Any exception -> the HTTPError the client sees. InvalidRequest (and MediaError, with its .status_code) and
    pydantic errors are the client's (4xx); anything else is the server's (500)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, InvalidRequest):
        status = getattr(exc, "status_code", 400)
        return HTTPError(status if 400 <= status < 500 else 400, exc.message, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        return _from_validation(exc)
    return HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def _error_json(err: HTTPError) -> JSONResponse:
    body = error_response(err.status, err.message, err.param, err.code)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers)


class _Admission:
    """Counts chat completions in flight on this app; refuses past the limit."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class _Admitted:
    """One admitted chat completion's resources: its concurrency slot, its metrics track and the backend stream.
    `release` is idempotent and runs on every path (error, success, cancellation, a response never sent)."""

    def __init__(self, admission: _Admission, track: RequestTrack):
        self.admission, self.track = admission, track
        self.events: Optional[AsyncIterator[Event]] = None
        self._released = False

    async def release(self, ok: bool) -> None:
        if self._released:
            return
        self._released = True
        try:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):  # runs even while the request's scope is being cancelled
                    await aclose()
        except Exception:
            log.exception("closing the backend stream failed")
        finally:
            self.admission.release()
            self.track.close(ok)


def _check_auth(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise HTTPError(401, "incorrect API key", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {int(declared)} bytes is more than the {limit} allowed",
                        code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise HTTPError(413, f"request body is more than the {limit} bytes allowed", code="request_too_large")
    return bytes(body)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "request body must be a JSON object", code="invalid_json")
    return ChatCompletionRequest.model_validate(obj)


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


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that releases its request however the response ends, even when its body never starts
    (a client gone before the first byte)."""

    def __init__(self, body: AsyncIterator[str], admitted: _Admitted):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.admitted = admitted

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.admitted.release(ok=False)  # a no-op when the body finished and released already


async def _sse_body(first: Event, comp: Completion, admitted: _Admitted, metrics: Metrics) -> AsyncIterator[str]:
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
        err = classify_error(e)
        if err.status >= 500:
            log.exception("stream %s failed", comp.id)
        metrics.stream_errors.inc()
        yield sse(error_response(err.status, err.message, err.param, err.code))
    except BaseException:  # cancelled: the client went away
        metrics.cancelled.inc()
        raise
    finally:
        await admitted.release(ok)
    yield SSE_DONE


def build_fastapi(backend: Union[Backend, Callable[[], Backend]], settings: ServerSettings = ServerSettings()
                  ) -> FastAPI:
    """backend: a Backend, or a zero-argument factory called (off the event loop) on first use."""
    app = FastAPI(title="omni", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.admission = _Admission(settings.max_concurrent_requests)
    if hasattr(backend, "stream"):
        app.state.backend, app.state.backend_factory = backend, None
    else:
        app.state.backend, app.state.backend_factory = None, backend
    app.state.backend_lock = asyncio.Lock()

    async def get_backend() -> Backend:
        if app.state.backend is None:
            async with app.state.backend_lock:
                if app.state.backend is None:
                    app.state.backend = await run_in_threadpool(app.state.backend_factory)
        return app.state.backend

    def served_name(b: Backend) -> str:
        return settings.served_model_name or b.model_name

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
        log.exception("unhandled error on %s", request.url.path)
        return _error_json(classify_error(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(request, settings)
        b = await get_backend()
        card = ModelCard(id=served_name(b), created=settings.created, root=b.model_name,
                         max_model_len=b.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/audio/voices")
    async def voices(request: Request):
        """This model's voices: {"object": "list", "model": NAME, "voices": ["Chelsie", "Ethan"]}; [] without speech."""
        _check_auth(request, settings)
        b = await get_backend()
        return {"object": "list", "model": served_name(b), "voices": list(b.voices)}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        _check_auth(request, settings)
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        metrics: Metrics = app.state.metrics
        admission: _Admission = app.state.admission
        try:
            _check_auth(request, settings)
        except HTTPError as e:
            metrics.count(e.status)
            return _error_json(e)
        if not admission.try_acquire():
            metrics.count(503)
            return _error_json(HTTPError(503, f"server is at its limit of {admission.limit} concurrent requests; "
                                              "retry later", code="overloaded"))
        admitted = _Admitted(admission, metrics.track())
        try:
            b = await get_backend()
            req = _parse(await _read_body(request, settings.max_body_bytes))
            if req.model and req.model != served_name(b):
                raise HTTPError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
            opts = ConvertOptions(max_tokens_limit=min(settings.max_tokens or b.max_model_len, b.max_model_len),
                                  default_max_tokens=settings.default_max_tokens,
                                  default_speech_tokens=settings.default_speech_tokens,
                                  **({"default_sampling": settings.default_sampling}
                                     if settings.default_sampling is not None else {}),
                                  media_limits=settings.media_limits, media_policy=settings.media_policy,
                                  allowed_local_media_path=settings.allowed_local_media_path,
                                  voices=tuple(b.voices))
            request_id = uuid.uuid4().hex
            t_media = time.perf_counter()
            chat = await _until_disconnect(request, run_in_threadpool(to_chat_request, req, request_id, opts))
            metrics.observe_stage("ingress_media", time.perf_counter() - t_media)
            b.validate(chat)
            comp = Completion(request_id, served_name(b), speak=chat.speak,
                              audio_format=req.audio.format if req.audio else "wav",
                              include_usage=bool(req.stream_options and req.stream_options.include_usage),
                              stop=req.stop_strings)
            events = admitted.events = b.stream(chat)
            if req.stream:
                try:  # the first event before the headers: an InvalidRequest raised late still gets its 400
                    first = await _until_disconnect(request, events.__anext__())
                except StopAsyncIteration:
                    raise RuntimeError("the backend stream ended without any event") from None
                metrics.count(200)
                return _SSEResponse(_sse_body(first, comp, admitted, metrics), admitted)

            async def collect():
                async for ev in events:
                    admitted.track.on_event(ev)
                    comp.feed(ev)
                    if comp.done:
                        break

            await _until_disconnect(request, collect())
            response = comp.response()
            await admitted.release(ok=True)
            metrics.count(200)
            return JSONResponse(response.model_dump())
        except _ClientGone:
            await admitted.release(ok=False)
            metrics.cancelled.inc()
            metrics.count(499)  # nginx's "client closed request"; nobody reads this response
            return Response(status_code=499)
        except BaseException as e:
            await admitted.release(ok=False)
            if not isinstance(e, Exception):
                raise
            err = classify_error(e)
            if err.status >= 500:
                log.exception("request failed")
            metrics.count(err.status)
            return _error_json(err)

    return app
