"""/v1/realtime when things go wrong, on test_realtime.py's server (real uvicorn, the in-process tiny pipeline): bad
events are `error` events with OpenAI's shape and the session goes on, events past the rate are refused, the socket
is refused without the key or a valid client secret (HTTP 401), and a client that vanishes mid-response frees every
slot. The official SDK's realtime client, and raw `websockets` where the SDK hides what is tested."""

import asyncio
import base64
import json
import time

import httpx
import pytest
import websockets

from .test_realtime import (
    DEADLINE,
    KEY,
    MODEL,
    RATE_LIMIT,
    idle,
    run,
    say,
    sdk,
    server,  # noqa: F401 (the module's uvicorn server, a fixture)
    setup,
    until,
)


# ---------------------------------------------------------------------------------------------------- bad events
def test_bad_events_are_error_events_and_the_session_goes_on(server):  # noqa: F811
    async def go():
        async with sdk(server) as conn:
            await setup(
                conn, output_modalities=["text"], max_output_tokens=64, audio={"input": {"turn_detection": None}}
            )
            errors, seen = [], []
            for raw in (
                '{"type": "no.such.event", "event_id": "evt_1"}',
                "not json",
                json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                json.dumps({"type": "input_audio_buffer.commit"}),
                json.dumps({"type": "session.update", "session": {"output_modalities": ["video"]}}),
                json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "Nobody"}}}}),
                json.dumps({"type": "conversation.item.delete", "item_id": "item_missing"}),
                json.dumps({"type": "response.cancel"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (2**20 + 8)}),
            ):
                await conn.send_raw(raw)
                errors.append(await until(conn, "error", seen))
            big = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(700_000)).decode()})
            for _ in range(5):  # 5 x 14.6 s of silence: past max_buffer_s (60)
                await conn.send_raw(big)
            errors.append(await until(conn, "error", seen))
            await conn.input_audio_buffer.clear()
            await until(conn, "input_audio_buffer.cleared", seen)
            await say(conn, "Tell me a story.")
            await conn.response.create()
            await until(conn, "response.created", seen)
            await conn.response.create()  # one is running already
            errors.append(await until(conn, "error", seen))
            done = await until(conn, "response.done", seen)
            await say(conn, "Again.")
            await conn.response.create()
            again = await until(conn, "response.done", seen)
            return errors, done, again

    errors, done, again = run(go())
    codes = [e["error"]["code"] for e in errors]
    assert codes == [
        "invalid_event_type",
        "invalid_json",
        "invalid_base64",
        "invalid_audio_format",
        "input_audio_buffer_commit_empty",
        "invalid_value",
        "invalid_value",
        "item_not_found",
        "response_cancel_not_active",
        "message_too_large",
        "input_audio_buffer_full",
        "conversation_already_has_active_response",
    ]
    first = errors[0]
    assert first["type"] == "error" and first["event_id"].startswith("event_")
    assert first["error"]["type"] == "invalid_request_error" and first["error"]["event_id"] == "evt_1"
    assert first["error"]["param"] == "type" and "no.such.event" in first["error"]["message"]
    assert errors[6]["error"]["param"] == "session.audio.output.voice"
    assert done["response"]["status"] in ("completed", "incomplete")
    assert again["response"]["status"] in ("completed", "incomplete")


def test_events_past_the_rate_are_refused(server):  # noqa: F811
    async def go():
        async with sdk(server) as conn:
            seen = []
            await until(conn, "session.created", seen)
            clear = json.dumps({"type": "input_audio_buffer.clear"})
            for _ in range(3 * RATE_LIMIT):
                await conn.send_raw(clear)
            err = await until(conn, "error", seen)
            return err

    err = run(go())
    assert err["error"]["code"] == "rate_limit_exceeded"


# ---------------------------------------------------------------------------------------------------- auth
def test_auth_key_and_client_secrets(server):  # noqa: F811
    ws_url = f"ws://127.0.0.1:{server.port}/v1/realtime?model={MODEL}"

    async def refused(**kw) -> int:
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            async with websockets.connect(ws_url, **kw):
                pass
        return e.value.response.status_code

    r = httpx.post(
        f"{server.url}/v1/realtime/client_secrets",
        timeout=30,
        json={
            "expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"type": "realtime", "instructions": "Be brief."},
        },
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(
        f"{server.url}/v1/realtime/client_secrets",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
        json={
            "expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"type": "realtime", "instructions": "Be brief."},
        },
    )
    assert r.status_code == 200, r.text
    secret = r.json()
    assert secret["value"].startswith("ek_") and secret["expires_at"] > time.time() + 50
    assert secret["session"]["instructions"] == "Be brief."
    bad = httpx.post(
        f"{server.url}/v1/realtime/client_secrets",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
        json={"expires_after": {"seconds": 5}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_after.seconds"

    async def go():
        statuses = [
            await refused(),
            await refused(additional_headers={"Authorization": "Bearer wrong"}),
            await refused(subprotocols=["realtime", "openai-insecure-api-key.ek_forged.sig"]),
        ]
        async with websockets.connect(
            ws_url, subprotocols=["realtime", "openai-insecure-api-key." + secret["value"]]
        ) as ws:  # a browser's way
            assert ws.subprotocol == "realtime"
            by_protocol = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
        async with websockets.connect(ws_url + "&client_secret=" + secret["value"]) as ws:
            by_query = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))
        async with sdk(server) as conn:  # the SDK's Bearer header
            by_key = json.loads(await asyncio.wait_for(conn.recv_bytes(), DEADLINE))
        return statuses, by_protocol, by_query, by_key

    statuses, by_protocol, by_query, by_key = run(go())
    assert statuses == [401, 401, 401]
    assert by_protocol["type"] == by_query["type"] == by_key["type"] == "session.created"
    assert by_protocol["session"]["instructions"] == "Be brief."  # the secret's session configuration
    assert by_key["session"]["instructions"] == ""


# ---------------------------------------------------------------------------------------------------- vanishing client
def test_a_client_that_vanishes_mid_response_frees_everything(server, pipeline):  # noqa: F811
    ws_url = f"ws://127.0.0.1:{server.port}/v1/realtime?model={MODEL}"

    async def go():
        ws = await websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"})
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "output_modalities": ["audio"],
                        "max_output_tokens": 400,
                        "max_output_audio_tokens": 2000,
                    },
                }
            )
        )
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Talk for a while."}],
                    },
                }
            )
        )
        await ws.send(json.dumps({"type": "response.create"}))
        while json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))["type"] != "response.output_audio.delta":
            pass
        ws.transport.abort()  # gone without a close frame

    run(go())
    idle(server, pipeline)
