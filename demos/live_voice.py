"""The demo's live voice mode, beside the chat: talk to the model from the browser microphone through `/v1/realtime`.

The page's script (live_voice.js, put in the page's <head>) does the audio and the WebSocket; this side only mints
what the browser may not hold: the API key stays here, the page gets a short-lived client secret from
`POST /v1/realtime/client_secrets` (through the official SDK) and opens `ws://HOST/v1/realtime?model=M` with it as
OpenAI's browser clients do (the subprotocol `openai-insecure-api-key.<secret>`).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Optional
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["LIVE_HEAD", "realtime_url", "mint_session", "live_section"]

LIVE_HEAD = "<script>\n" + (files("omni.demos") / "live_voice.js").read_text() + "\n</script>"  # launch(head=...)
SECRET_TTL_S = 600  # the client secret opens a session within this; the session then lives on its own limits


def realtime_url(api_url: str, model: str) -> str:
    """The SDK's base URL (http://HOST:PORT/v1) -> the WebSocket URL of its realtime endpoint."""
    parts = urlsplit(api_url.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path + "/realtime", f"model={quote(model)}", ""))


async def mint_session(client, api_url: str, model: str, voice: Optional[str], instructions: str) -> dict[str, Any]:
    """-> what the page's `omniLive.start` takes: {url, secret, voice, instructions}, or {error} for the page."""
    session = {
        "type": "realtime",
        "output_modalities": ["audio"],
        **({"instructions": instructions} if instructions.strip() else {}),
        **({"audio": {"output": {"voice": voice}}} if voice else {}),
    }
    secret = await client.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": SECRET_TTL_S}, session=session
    )
    return {"url": realtime_url(api_url, model), "secret": secret.value, "voice": voice, "instructions": instructions}


_START_JS = "(cfg) => { if (cfg && cfg.url) window.omniLive.start(cfg); return []; }"
_STOP_JS = "() => { window.omniLive.stop(); return []; }"


def live_section(gr, mint, voice, system, describe_error) -> None:
    """The live-voice panel, in the current Blocks context. mint(voice, system) -> mint_session's dict.
    Element ids: live-start, live-stop, live-state, live-log."""
    with gr.Accordion(
        "Live voice: talk with the microphone (server VAD turns, speak to interrupt)", open=True, elem_id="live"
    ):
        gr.HTML(
            '<div id="live-state">Live voice: off</div><div id="live-log" style="max-height:220px;'
            'overflow-y:auto"></div>',
            elem_id="live-panel",
        )
        cfg = gr.JSON(visible=False)
        with gr.Row():
            start = gr.Button("Start live voice", elem_id="live-start", variant="primary")
            stop = gr.Button("Stop live voice", elem_id="live-stop")

    async def on_start(voice_value, system_value):
        try:
            return await mint(voice_value, system_value or "")
        except Exception as e:  # noqa: BLE001 - shown on the page
            gr.Warning(describe_error(e))
            return {}

    start.click(on_start, [voice, system], [cfg]).then(None, [cfg], None, js=_START_JS)
    stop.click(None, None, None, js=_STOP_JS)
