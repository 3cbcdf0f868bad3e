"""OpenAI's Realtime API on the app: `GET /v1/realtime` (WebSocket, GA event names; serve/api/realtime_session.py
runs a session) and `POST /v1/realtime/client_secrets` (short-lived secrets for browsers; realtime_auth.py).

The socket is refused before it opens (HTTP 401 with OpenAI's error body where the server supports denial
responses, else close code 1008) without a valid key or secret. Once open, every bad client event (unknown type,
bad JSON or base64, odd-length PCM, a response.create while one runs, over the rate or size limit) gets an `error`
event and the session goes on; the session ends when the client closes or vanishes (its response, if any, is
cancelled in every stage), or after `realtime.max_session_s` (an `error` event with code session_expired, then
close 1000)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Optional

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from omni.serve.api.common import HTTPError, parse_body, read_body
from omni.serve.api.convert import error_response
from omni.serve.api.realtime_auth import ClientSecrets, credentials
from omni.serve.api.realtime_events import RealtimeError, RealtimeLimits, SessionConfig, error_event, server_event
from omni.serve.api.realtime_session import Session

__all__ = ["handle_raw", "mount_realtime"]

log = logging.getLogger("omni.serve.api.realtime")


class _Bucket:
    """Events per second: a bucket of `rate` tokens refilled at `rate` per second."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.t = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Obj:
    """parse_body's model for a plain JSON object."""

    @staticmethod
    def model_validate(obj: dict) -> dict:
        return obj


def _secret_request(body: bytes, ttl_default: int) -> tuple[int, dict]:
    """client_secrets' body -> (ttl seconds, the session patch); HTTPError 400 for a bad one."""
    obj = parse_body(body, _Obj) if body.strip() else {}
    expires = obj.get("expires_after") or {}
    if not isinstance(expires, dict) or expires.get("anchor", "created_at") != "created_at":
        raise HTTPError(
            400, 'expires_after must be {"anchor": "created_at", "seconds": N}', "expires_after", "invalid_value"
        )
    ttl = expires.get("seconds", ttl_default)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 10 <= ttl <= 7200:
        raise HTTPError(
            400, "expires_after.seconds must be an integer in 10..7200", "expires_after.seconds", "invalid_value"
        )
    session = obj.get("session") or {}
    if not isinstance(session, dict) or session.get("type", "realtime") != "realtime":
        raise HTTPError(
            400, 'session must be a realtime session ({"type": "realtime", ...})', "session", "invalid_value"
        )
    return ttl, session


class _Connection:
    """One socket: auth, then a reader loop (rate and size limits, JSON, dispatch) and one writer task."""

    def __init__(self, ws: WebSocket, routes, secrets: ClientSecrets):
        self.ws, self.routes, self.secrets = ws, routes, secrets
        self.limits = routes.settings.realtime
        self.out: asyncio.Queue = asyncio.Queue()

    def authenticate(self) -> Optional[dict]:
        """-> the session patch the credential carries ({} for the API key or an open server); None: refused."""
        offered, in_query = credentials(
            self.ws.headers, list(self.ws.scope.get("subprotocols") or []), self.ws.query_params
        )
        return self.secrets.authorize(self.routes.settings.api_key, offered, in_query)

    async def refuse(self, message: str) -> None:
        body = error_response(401, message, None, "invalid_api_key").model_dump()
        try:
            await self.ws.send_denial_response(
                JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            )
        except RuntimeError:  # the server has no denial responses: close before accepting (HTTP 403)
            await self.ws.close(code=1008, reason=message[:120])

    def emit(self, event: dict) -> None:
        self.out.put_nowait(event)

    async def writer(self) -> None:
        while True:
            event = await self.out.get()
            if event is None:
                return
            await self.ws.send_text(json.dumps(event))

    async def run(self) -> None:
        patch = self.authenticate()
        if patch is None:
            await self.refuse(
                "missing or incorrect API key or client secret: send `Authorization: Bearer <key>`, "
                "or a client secret from POST /v1/realtime/client_secrets"
            )
            return
        routes = self.routes
        if routes.draining:
            await self.ws.close(code=1013, reason="server is shutting down")
            return
        requested = self.ws.scope.get("subprotocols") or []
        await self.ws.accept(subprotocol="realtime" if "realtime" in requested else None)
        session = Session(routes, self.emit, SessionConfig())
        deadline = time.monotonic() + self.limits.max_session_s
        session.expires_at = int(time.time() + self.limits.max_session_s)
        writer = asyncio.ensure_future(self.writer())
        try:
            try:
                session.config = session.check_config(session.config.updated(patch, "session"))
            except RealtimeError as e:
                self.emit(error_event(e))
            await session.start()
            self.emit(server_event("session.created", session=session.wire()))
            await self._read(session, deadline, writer)
        except WebSocketDisconnect:
            pass
        finally:
            await session.close()
            self.out.put_nowait(None)
            if not writer.done():
                try:
                    await asyncio.wait_for(writer, 5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the client is gone
                    writer.cancel()

    async def _read(self, session: Session, deadline: float, writer: asyncio.Task) -> None:
        bucket = _Bucket(self.limits.max_events_per_s)
        while True:
            left = deadline - time.monotonic()
            receive = asyncio.ensure_future(self.ws.receive())
            done, _ = await asyncio.wait({receive, writer}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                if writer in done:  # the socket failed under the writer: the client is gone
                    return
                self.emit(
                    error_event(
                        RealtimeError(
                            f"the session reached its maximum length of {self.limits.max_session_s} s",
                            None,
                            "session_expired",
                        )
                    )
                )
                self.out.put_nowait(None)
                await asyncio.wait_for(writer, 5)
                await self.ws.close(code=1000, reason="session expired")
                return
            msg = receive.result()
            if msg["type"] == "websocket.disconnect":
                return
            raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes") or b""
            await handle_raw(session, raw, bucket, self.limits, self.emit)


async def handle_raw(
    session: Session, raw, bucket: _Bucket, limits: RealtimeLimits, emit: Callable[[dict], None]
) -> None:
    """One client event as received (text or bytes): rate and size limits, JSON, dispatch; a bad one becomes an
    `error` event and the session goes on (the reader of the WebSocket and of WebRTC's data channel)."""
    client_id = None
    try:
        if not bucket.take():
            raise RealtimeError(
                f"more than {limits.max_events_per_s:g} events per second; this event was dropped",
                None,
                "rate_limit_exceeded",
            )
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > limits.max_message_bytes:
            raise RealtimeError(
                f"event of {size} bytes is more than the {limits.max_message_bytes} allowed",
                None,
                "message_too_large",
            )
        try:
            ev = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise RealtimeError(f"event is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(ev, dict):
            raise RealtimeError("an event is a JSON object with a `type`", None, "invalid_json")
        client_id = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
        await session.handle(ev)
    except RealtimeError as e:
        emit(error_event(e, client_id))
    except Exception as e:  # noqa: BLE001 - the session goes on
        log.exception("realtime event failed")
        emit(
            error_event(
                RealtimeError(f"internal server error: {type(e).__name__}", None, "internal_error", "server_error"),
                client_id,
            )
        )


def mount_realtime(app: FastAPI, routes, check_auth: Callable[[Request, object], None]) -> ClientSecrets:
    """Add /v1/realtime and /v1/realtime/client_secrets to `app` (routes: the app's _Routes); -> the secrets' signer
    (WebRTC's /v1/realtime/calls takes the same secrets)."""
    settings = routes.settings
    secrets = ClientSecrets(settings.api_key)

    @app.websocket("/v1/realtime")
    async def _realtime(ws: WebSocket):
        await _Connection(ws, routes, secrets).run()

    @app.post("/v1/realtime/client_secrets")
    async def _client_secrets(request: Request):
        check_auth(request, settings)
        ttl, patch = _secret_request(
            await read_body(request, settings.max_body_bytes), settings.realtime.client_secret_ttl_s
        )
        probe = Session(routes, lambda e: None, SessionConfig())
        try:
            cfg = probe.check_config(SessionConfig().updated(patch, "session"))
        except RealtimeError as e:
            raise HTTPError(400, e.message, e.param, e.code) from None
        value, expires_at = secrets.issue(ttl, patch)
        return JSONResponse(
            {"value": value, "expires_at": expires_at, "session": cfg.wire(probe.id, routes.served_name, expires_at)}
        )

    return secrets
