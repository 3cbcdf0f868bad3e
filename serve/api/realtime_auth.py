"""Who may open /v1/realtime: the server's API key, or a short-lived client secret from
`POST /v1/realtime/client_secrets` (for browsers, which cannot set an Authorization header on a WebSocket).

A credential comes as `Authorization: Bearer <key or secret>`, as the WebSocket subprotocol
`openai-insecure-api-key.<key or secret>` (OpenAI's browser clients: `new WebSocket(url, ["realtime",
"openai-insecure-api-key." + secret])`), or, for a client secret only, as the query parameter `client_secret`.

A client secret is stateless: `ek_<payload>.<signature>`, the payload (expiry, a nonce and the session
configuration it was issued with) signed with HMAC-SHA256 under the API key, so any ingress replica of the app
accepts it until it expires, and none can be forged without the key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any, Optional

__all__ = ["ClientSecrets", "SUBPROTOCOL_PREFIX", "credentials"]

SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
PREFIX = "ek_"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClientSecrets:
    def __init__(self, api_key: Optional[str]):
        # no API key: the server is open and secrets are a formality; sign them with a key of this process
        self._key = (api_key or secrets.token_hex(32)).encode()

    def issue(self, ttl_s: int, session: Optional[dict]) -> tuple[str, int]:
        """-> (the secret, its expiry in seconds since the epoch)."""
        expires_at = int(time.time()) + int(ttl_s)
        payload = _b64(
            json.dumps(
                {"exp": expires_at, "n": secrets.token_hex(8), "s": session or {}}, separators=(",", ":")
            ).encode()
        )
        return f"{PREFIX}{payload}.{self._sign(payload)}", expires_at

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def verify(self, token: str) -> Optional[dict]:
        """The session configuration of a valid, unexpired secret; None otherwise."""
        if not token.startswith(PREFIX):
            return None
        payload, _, sig = token[len(PREFIX) :].partition(".")
        if not payload or not hmac.compare_digest(sig.encode(), self._sign(payload).encode()):
            return None
        try:
            data: Any = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int) or data["exp"] < time.time():
            return None
        return data.get("s") if isinstance(data.get("s"), dict) else {}

    def authorize(self, api_key: Optional[str], offered: list[str], in_query: list[str]) -> Optional[dict]:
        """Credentials (from `credentials`) -> the session patch they carry ({} for the API key or an open server);
        None: refused."""
        if api_key is None:
            return {}
        for token in offered + in_query:
            if token in offered and hmac.compare_digest(token.encode(), api_key.encode()):
                return {}
            patch = self.verify(token)
            if patch is not None:
                return patch
        return None


def credentials(headers, subprotocols: list[str], query) -> tuple[list[str], list[str]]:
    """-> (keys or secrets offered by header or subprotocol, secrets offered by query)."""
    offered = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        offered.append(token.strip())
    offered += [p[len(SUBPROTOCOL_PREFIX) :] for p in subprotocols if p.startswith(SUBPROTOCOL_PREFIX)]
    in_query = [q for q in query.getlist("client_secret") if q.startswith(PREFIX)]
    return offered, in_query
