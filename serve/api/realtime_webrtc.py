"""WebRTC for the Realtime API, as OpenAI's: `POST /v1/realtime/calls` and `POST /v1/realtime/calls/{id}/hangup`.

The request is the SDP offer, as the body (`Content-Type: application/sdp`) or as multipart/form-data with the fields
`sdp` and, optionally, `session` (a JSON session object, as client_secrets takes); authorized by the API key or a
client secret from `POST /v1/realtime/client_secrets` (`Authorization: Bearer ek_...`; the secret's session applies
first, then the request's). The reply: 201, the SDP answer as `application/sdp`, and `Location:
/v1/realtime/calls/{call_id}`. Audio goes both ways as Opus RTP, every event as the WebSocket's JSON on the
`oai-events` data channel the client opens (serve/api/realtime_webrtc_peer.py). A bad offer or session: 400 with
OpenAI's error body; no or a bad credential: 401; the server without aiortc (the `webrtc` extra): 501.

A web page of any origin may call it (CORS: the credential is a bearer token, never a cookie), as OpenAI's API."""

from __future__ import annotations

import asyncio
import json
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from omni.serve.api.common import HTTPError, error_json, read_body
from omni.serve.api.realtime_auth import ClientSecrets, credentials

__all__ = ["mount_webrtc", "parse_offer"]

MAX_OFFER_BYTES = 256 * 1024  # an SDP offer is a few kB
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Location"}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


def _cors(response: Response) -> Response:
    response.headers.update(CORS)
    return response


def parse_offer(body: bytes, content_type: str) -> tuple[str, dict]:
    """The request body -> (the SDP offer, the session patch); HTTPError 400 for a malformed one."""
    kind = content_type.partition(";")[0].strip().lower()
    session: Any = {}
    if kind == "multipart/form-data":
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        fields: dict[str, bytes] = {}
        for part in msg.iter_parts() if msg.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                fields[name] = payload
        raw, sdp_bytes = fields.get("session"), fields.get("sdp", b"")
        if raw is not None and raw.strip():
            try:
                session = json.loads(raw)
            except ValueError as e:
                raise HTTPError(400, f"session is not valid JSON: {e}", "session", "invalid_json") from None
    elif kind in ("application/sdp", "text/plain", ""):
        sdp_bytes = body
    else:
        raise HTTPError(
            400,
            f"unsupported Content-Type {kind!r}: send the SDP offer as application/sdp, or multipart/form-data "
            "with the fields sdp and session",
            "Content-Type",
            "invalid_value",
        )
    try:
        sdp = sdp_bytes.decode("utf-8")
    except UnicodeDecodeError:
        sdp = ""
    if not sdp.lstrip().startswith("v=0"):
        raise HTTPError(400, "sdp must be an SDP offer (text starting with v=0)", "sdp", "invalid_offer")
    if not isinstance(session, dict) or session.get("type", "realtime") != "realtime":
        raise HTTPError(
            400, 'session must be a realtime session ({"type": "realtime", ...})', "session", "invalid_value"
        )
    return sdp, session


def mount_webrtc(app: FastAPI, routes, secrets: ClientSecrets) -> None:
    """Add /v1/realtime/calls to `app` (routes: the app's _Routes; secrets: mount_realtime's). The calls in progress
    are `app.state.realtime_calls` (call id -> realtime_webrtc_peer.Call); the app's shutdown (ASGI lifespan: Serve's
    ingress, uvicorn with lifespan on) hangs them all up."""
    settings = routes.settings
    calls: dict[str, Any] = {}
    app.state.realtime_calls = calls

    async def hang_up_every_call() -> None:
        """A call ends when its peer hangs up or goes away, and a peer that vanished unannounced (a closed browser)
        is noticed only when its ICE consent expires (~30 s): a server stopping would wait that long for it."""
        await asyncio.gather(*(call.hangup() for call in list(calls.values())), return_exceptions=True)

    app.router.add_event_handler("shutdown", hang_up_every_call)

    def authorize(request: Request) -> dict:
        offered, in_query = credentials(request.headers, [], request.query_params)
        patch = secrets.authorize(settings.api_key, offered, in_query)
        if patch is None:
            raise HTTPError(
                401,
                "missing or incorrect API key or client secret: send `Authorization: Bearer <key>`, or a client "
                "secret from POST /v1/realtime/client_secrets",
                code="invalid_api_key",
            )
        return patch

    async def create(request: Request) -> Response:
        patch = authorize(request)
        if routes.draining:
            raise HTTPError(503, "server is shutting down; retry on another replica", code="shutting_down")
        body = await read_body(request, min(settings.max_body_bytes, MAX_OFFER_BYTES))
        sdp, session = parse_offer(body, request.headers.get("content-type", ""))
        try:  # aiortc is the webrtc extra
            from omni.serve.api.realtime_webrtc_peer import Call
        except ImportError as e:
            raise HTTPError(
                501, f"WebRTC needs aiortc (pip install 'omni[webrtc]'): {e}", None, "webrtc_unavailable"
            ) from None
        call = Call(routes, calls)
        answer = await call.open(sdp, [patch, session])
        return Response(
            answer,
            status_code=201,
            media_type="application/sdp",
            headers={"Location": f"/v1/realtime/calls/{call.id}"},
        )

    async def hangup(call_id: str, request: Request) -> Response:
        authorize(request)
        call = calls.get(call_id)
        if call is None:
            raise HTTPError(404, f"no call {call_id!r} in progress on this server", "call_id", "call_not_found")
        await call.hangup()
        return Response(status_code=200)

    @app.post("/v1/realtime/calls")
    async def _create_call(request: Request):
        try:
            return _cors(await create(request))
        except HTTPError as e:  # answered here, with the CORS headers a page needs to read the error
            return _cors(error_json(e))

    @app.post("/v1/realtime/calls/{call_id}/hangup")
    async def _hangup(call_id: str, request: Request):
        try:
            return _cors(await hangup(call_id, request))
        except HTTPError as e:
            return _cors(error_json(e))

    @app.options("/v1/realtime/calls")
    @app.options("/v1/realtime/calls/{call_id}/hangup")
    async def _preflight():
        return Response(status_code=204, headers=PREFLIGHT)
