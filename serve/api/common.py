"""What the HTTP handlers share (chat completions in server.py, speech in speech.py): the error type and its
OpenAI error body, the classification of any exception into one, reading and parsing a bounded JSON body, and the
streaming response that releases its admitted request however it ends."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from omni.types import InvalidRequest, StageUnavailable
from omni.serve.api.admission import Admitted
from omni.serve.api.convert import error_response
from omni.serve.api.protocol import ChatCompletionRequest
from omni.serve.config import field_path

__all__ = [
    "HTTPError",
    "ClientGone",
    "classify_error",
    "error_json",
    "read_body",
    "check_json_nesting",
    "parse_body",
    "StreamResponse",
    "RETRY_AFTER_S",
    "MAX_JSON_DEPTH",
    "MAX_JSON_CONTAINERS",
]

RETRY_AFTER_S = 1  # the Retry-After of a 503 (over the concurrency limit, or draining for shutdown)
MAX_JSON_DEPTH = 32  # a chat request nests ~6 levels
MAX_JSON_CONTAINERS = 100_000  # arrays + objects in one body


class HTTPError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientGone(Exception):
    pass


def _from_validation(e: ValidationError) -> HTTPError:
    errors = e.errors()
    parts = []
    for err in errors[:5]:
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{field_path(err['loc'])}: {msg}" if err.get("loc") else msg)
    param = field_path(errors[0]["loc"]) if errors and errors[0].get("loc") else None
    return HTTPError(400, "invalid request: " + "; ".join(parts), param, "invalid_request")


def _client_error(exc: Optional[BaseException]) -> Optional[BaseException]:
    """The client's error inside `exc`, also when a stage in another process raised it (Ray wraps a replica's
    exception and keeps the original as `.cause`; asyncio and generators chain it as `__cause__`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (HTTPError, InvalidRequest, ValidationError)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def classify_error(exc: BaseException, request_id: Optional[str] = None) -> HTTPError:
    """Any exception -> the HTTPError the client sees. InvalidRequest (and MediaError, with its .status_code) and
    pydantic errors are the client's (4xx), wherever they were raised; StageUnavailable (a replica died or is
    restarting) is a 503 to retry; anything else is the server's: a 500 that names the request id (the log has the
    details) and says nothing of the internals."""
    if isinstance(exc, StageUnavailable):
        return HTTPError(503, str(exc), code="stage_unavailable")
    client = _client_error(exc)
    if isinstance(client, HTTPError):
        return client
    if isinstance(client, InvalidRequest):
        status = getattr(client, "status_code", 400)
        return HTTPError(status if 400 <= status < 500 else 400, client.message, client.param, client.code)
    if isinstance(client, ValidationError):
        return _from_validation(client)
    rid = f" (request id {request_id})" if request_id else ""
    return HTTPError(500, f"internal server error{rid}; the server log has the details", code="internal_error")


def error_json(err: HTTPError) -> JSONResponse:
    body = error_response(err.status, err.message, err.param, err.code)
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if err.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(
            413, f"request body of {int(declared)} bytes is more than the {limit} allowed", code="request_too_large"
        )
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise HTTPError(413, f"request body is more than the {limit} bytes allowed", code="request_too_large")
    return bytes(body)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")


def check_json_nesting(body: bytes, max_depth: int = MAX_JSON_DEPTH, max_containers: int = MAX_JSON_CONTAINERS) -> None:
    """Bound the nesting of a JSON body before parsing it (the decoder recurses per level). Strings are skipped;
    what is left is brackets. Raises HTTPError 400."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", body))
    if len(brackets) > 2 * max_containers:
        raise HTTPError(
            400, f"request body has more than {max_containers} JSON arrays and objects", code="invalid_json"
        )
    depth = 0
    for b in brackets:
        depth += 1 if b in b"[{" else -1
        if depth > max_depth:
            raise HTTPError(400, f"request body nests JSON deeper than {max_depth} levels", code="invalid_json")


def parse_body(body: bytes, model=ChatCompletionRequest):
    """A JSON object body -> `model` (pydantic); HTTPError 400 for anything else."""
    check_json_nesting(body)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "request body must be a JSON object", code="invalid_json")
    return model.model_validate(obj)


class StreamResponse(StreamingResponse):
    """A StreamingResponse that releases its request however the response ends, even when its body never starts
    (a client gone before the first byte)."""

    def __init__(self, body: AsyncIterator, admitted: Admitted, media_type: str = "text/event-stream"):
        super().__init__(
            body,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": admitted.request_id},
        )
        self.admitted = admitted

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:  # a client gone while the body waited at a yield (its chunk being sent) leaves the body suspended
                # there, to be closed whenever it is collected: close it now, so that its own cleanup (the cancel it
                # counts, the backend stream it closes) runs at the disconnect
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                await self.admitted.release(ok=False)  # a no-op when the body finished and released already
