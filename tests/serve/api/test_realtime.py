"""/v1/realtime on a real uvicorn server in front of the in-process Pipeline (tiny), driven by the official `openai`
SDK's realtime client (`client.realtime.connect`): text and spoken turns, server VAD, barge-in, its /metrics, 16
sessions at once, the README example. Golden answers: the official transformers path (omni.reference) for text, and
the chat completions of the same conversation for speech. What goes wrong (bad events, rate, auth, a vanishing
client): test_realtime_errors.py, on this module's server fixture."""

import asyncio
import base64
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families
from spoken import espeak_wav

from omni.prompt import prepare_prompt
from omni.reference import reference_generate
from omni.types import AudioPart, ChatRequest, Message
from omni.encoders.media import load_audio
from omni.serve.api.audio_io import wav_header
from omni.serve.api.convert import ConvertOptions, to_chat_request
from omni.serve.api.local_server import LocalServer
from omni.serve.api.protocol import ChatCompletionRequest
from omni.serve.api.realtime_events import RealtimeLimits
from omni.serve.api.server import ServerSettings, build_fastapi

KEY = "sk-rt-key"
MODEL = "qwen-omni-tiny"
DEADLINE = 120  # seconds any awaited event may take (generous: a shared 2-core machine)
RATE = 24000
CHUNK = 4800  # 200 ms of 24 kHz PCM16 per input_audio_buffer.append
RATE_LIMIT = 100  # client events per second
TALKER_TOKENS = 40  # the random tiny Talker rarely stops on its own: bound the speech


@pytest.fixture(scope="module")
def server(pipeline):
    settings = ServerSettings(
        served_model_name=MODEL,
        api_key=KEY,
        max_tokens=512,
        default_max_tokens=16,
        default_speech_tokens=TALKER_TOKENS,
        realtime=RealtimeLimits(max_events_per_s=RATE_LIMIT, max_message_bytes=2**20),
    )
    with LocalServer(build_fastapi(pipeline, settings)) as s:
        yield s


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> bytes:
    """A spoken question (espeak-ng), as PCM16 mono 24 kHz bytes."""
    d = tmp_path_factory.mktemp("rt")
    espeak_wav("Hello there, what is the weather like today?", d / "q24.wav", RATE)
    pcm, sr = sf.read(d / "q24.wav", dtype="int16")
    assert sr == RATE
    return pcm.astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(2 * ms * RATE // 1000)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 4 * DEADLINE))


def sdk(server, **kw):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    return client.realtime.connect(model=MODEL, **kw)


async def until(conn, kind: str, seen: list) -> dict:
    """Receive events (as dicts) into `seen` until one of type `kind`; -> that event."""
    while True:
        try:
            raw = await asyncio.wait_for(conn.recv_bytes(), DEADLINE)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {kind} within {DEADLINE} s; got {[e['type'] for e in seen][-30:]}") from None
        ev = json.loads(raw)
        seen.append(ev)
        if ev["type"] == kind:
            return ev
        assert ev["type"] != "error", ev  # an error event where none was due


def of(seen: list, kind: str) -> list:
    return [e for e in seen if e["type"] == kind]


async def setup(conn, **session) -> dict:
    seen = []
    created = await until(conn, "session.created", seen)
    await conn.session.update(session={"type": "realtime", **session})
    await until(conn, "session.updated", seen)
    return created


async def append(conn, pcm: bytes) -> None:
    for i in range(0, len(pcm), 2 * CHUNK):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 2 * CHUNK]).decode())


async def say(conn, text: str) -> None:
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )


def chat_request(messages, **kw):
    req = ChatCompletionRequest.model_validate({"messages": messages, **kw})
    return to_chat_request(req, "ref", ConvertOptions(max_tokens_limit=512, voices=("Chelsie", "Ethan")))


def idle(server, pipeline) -> None:
    """Wait (bounded) until no stage runs a request and no admission slot is held."""
    routes = server.server.config.app.state.routes
    deadline = time.time() + DEADLINE
    while True:
        stats = server.call(asyncio.to_thread(pipeline.stage_stats))
        running = {k: v["running"] for k, v in stats.items()}
        if not any(running.values()) and routes.admission.active == 0:
            return
        assert time.time() < deadline, f"still running after the session ended: {running}"
        time.sleep(0.05)


SESSIONS = "omni_realtime_sessions_active"
TURNS = "omni_realtime_turn_latency_seconds"  # _count, _sum
BARGE_INS = "omni_realtime_barge_ins_total"


async def scrape(server) -> dict[str, float]:
    """GET /metrics over HTTP -> {sample name: value} for the realtime samples (no labels)."""
    async with httpx.AsyncClient(timeout=DEADLINE) as client:
        r = await client.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
        if s.name.startswith("omni_realtime_") and not s.labels
    }


async def sessions_back_to(server, n: float) -> dict[str, float]:
    """Scrape until the active-sessions gauge reads `n` (the server closes a session after the client has left)."""
    deadline = time.time() + DEADLINE
    while True:
        m = await scrape(server)
        if m[SESSIONS] == n:
            return m
        assert time.time() < deadline, f"{m[SESSIONS]} realtime sessions still active, expected {n}"
        await asyncio.sleep(0.05)


def moved(before: dict, after: dict) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


# ---------------------------------------------------------------------------------------------------- text
def test_text_turns_equal_the_reference(server, tiny):
    """Two text turns: each reply equals the official transformers path's for the whole conversation so far."""

    async def go():
        async with sdk(server) as conn:
            created = await setup(
                conn, output_modalities=["text"], max_output_tokens=12, audio={"input": {"turn_detection": None}}
            )
            assert created["session"]["model"] == MODEL
            assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            turns = []
            for question in ("Tell me a story.", "And then what happened?"):
                await say(conn, question)
                await conn.response.create()
                seen = []
                done = await until(conn, "response.done", seen)
                turns.append((question, seen, done))
            return turns

    turns = run(go())
    messages = []
    for question, seen, done in turns:
        messages.append({"role": "user", "content": question})
        ref = reference_generate(tiny, chat_request(messages, max_tokens=12))
        text = "".join(e["delta"] for e in of(seen, "response.output_text.delta"))
        assert text == ref.text and text
        assert of(seen, "response.output_text.done")[0]["text"] == text
        usage = done["response"]["usage"]
        assert usage["output_tokens"] == len(ref.token_ids) and usage["input_tokens"] == len(ref.prompt_ids)
        assert done["response"]["status"] in ("completed", "incomplete")
        assert done["response"]["output"][0]["content"] == [{"type": "output_text", "text": text}]
        kinds = [e["type"] for e in seen]
        order = [
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        ]
        assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
        messages.append({"role": "assistant", "content": text})


# ---------------------------------------------------------------------------------------------------- audio + VAD
def test_spoken_turn_with_server_vad_equals_the_chat_completion(server, spoken):
    """An espeak-ng question with silence after it: the server VAD finds the turn, commits it and answers; the audio
    deltas are the chat completion's speech for the same audio (bit-exact), the transcript its text."""
    sent = silence(400) + spoken + silence(1200)

    async def go():
        before = await scrape(server)
        async with sdk(server) as conn:
            await setup(
                conn,
                output_modalities=["audio"],
                max_output_tokens=8,
                seed=3,
                max_output_audio_tokens=TALKER_TOKENS,
                audio={
                    "output": {"voice": "Ethan"},
                    "input": {
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.5,
                            "prefix_padding_ms": 300,
                            "silence_duration_ms": 600,
                        }
                    },
                },
            )
            t0 = time.perf_counter()
            await append(conn, sent)
            seen = []
            await until(conn, "response.done", seen)
            wall = time.perf_counter() - t0
            during = await scrape(server)
        return seen, before, during, await sessions_back_to(server, before[SESSIONS]), wall

    seen, before, during, after, wall = run(go())
    # /metrics: one more session while it ran, one turn (end of speech to the first audio delta), no barge-in
    assert during[SESSIONS] == before[SESSIONS] + 1
    turn = moved(before, during)
    assert turn[TURNS + "_count"] == 1 and 0 < turn[TURNS + "_sum"] < wall and turn[BARGE_INS] == 0
    assert moved(during, after)[TURNS + "_count"] == 0
    started, stopped = of(seen, "input_audio_buffer.speech_started"), of(seen, "input_audio_buffer.speech_stopped")
    assert len(started) == len(stopped) == 1
    a, b = started[0]["audio_start_ms"], stopped[0]["audio_end_ms"]
    assert 0 < a < 400 + 300 and a + 1000 < b <= len(sent) // 48, (a, b)
    committed = of(seen, "input_audio_buffer.committed")[0]
    assert committed["item_id"] == started[0]["item_id"] == stopped[0]["item_id"]
    user = [e for e in of(seen, "conversation.item.added") if e["item"]["role"] == "user"][0]
    assert user["item"]["content"][0]["type"] == "input_audio"
    done = of(seen, "response.done")[0]
    assert done["response"]["status"] in ("completed", "incomplete")
    pcm = b"".join(base64.b64decode(e["delta"]) for e in of(seen, "response.output_audio.delta"))
    transcript = "".join(e["delta"] for e in of(seen, "response.output_audio_transcript.delta"))

    turn = sent[a * 48 : b * 48]  # the committed audio: 24 samples (48 bytes) per ms
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=DEADLINE)
    wav = base64.b64encode(wav_header(len(turn), RATE) + turn).decode()
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=8,
        seed=3,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"},
        messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}
        ],
        extra_body={"sampling_params_list": [{}, {"max_tokens": TALKER_TOKENS}]},
    )
    assert pcm and pcm == base64.b64decode(r.choices[0].message.audio.data)
    assert transcript == r.choices[0].message.content
    assert of(seen, "response.output_audio_transcript.done")[0]["transcript"] == transcript


# ---------------------------------------------------------------------------------------------------- barge-in
def test_barge_in_cancels_the_response_and_keeps_what_was_heard(server, pipeline, spoken):
    """Speech while a spoken reply streams: the reply is cancelled in every stage (no running rows), response.done
    says cancelled (turn_detected), its item keeps the audio sent and the transcript the Talker had by then; the
    user's new turn is answered with that in its context; item.truncate cuts it further to what was played. (The
    reply at the end of a VAD turn is the spoken test's; here the next one is asked for once the slots are checked.)"""

    async def go():
        before = await scrape(server)
        async with sdk(server) as conn:
            await setup(
                conn,
                output_modalities=["audio"],
                max_output_tokens=400,
                max_output_audio_tokens=2000,
                audio={
                    "input": {
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 600, "create_response": False}
                    }
                },
            )
            await say(conn, "Tell me a long story.")
            await conn.response.create()
            seen = []
            await until(conn, "response.output_audio.delta", seen)
            await conn.session.update(
                session={
                    "type": "realtime",
                    "max_output_tokens": 8,  # for the next turn
                    "max_output_audio_tokens": TALKER_TOKENS,
                }
            )
            await append(conn, silence(200) + spoken + silence(1000))  # the user talks over the reply
            cancelled = await until(conn, "response.done", seen)
            barged = await scrape(server)
            idle(server, pipeline)  # the cancelled reply holds no slot in any stage
            await until(conn, "input_audio_buffer.committed", seen)
            await conn.response.create()
            answered = await until(conn, "response.done", seen)
            item = cancelled["response"]["output"][0]
            sent = sum(
                len(base64.b64decode(e["delta"]))
                for e in seen
                if e["type"] == "response.output_audio.delta" and e["response_id"] == cancelled["response"]["id"]
            )
            played_ms = sent // 48 // 2  # the client played half of what it got
            await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=played_ms)
            truncated = await until(conn, "conversation.item.truncated", seen)
            await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=10**7)
            err = await until(conn, "error", seen)
            during = await scrape(server)
        after = await sessions_back_to(server, before[SESSIONS])
        # /metrics: the barge-in counted once; the first reply (asked for by text) is no turn, the reply to the
        # committed speech is one
        assert moved(before, barged)[BARGE_INS] == 1 and moved(before, barged)[TURNS + "_count"] == 0
        assert moved(before, during)[BARGE_INS] == 1 and moved(before, during)[TURNS + "_count"] == 1
        assert during[SESSIONS] == before[SESSIONS] + 1 and moved(during, after)[BARGE_INS] == 0
        return seen, cancelled, answered, truncated, err, played_ms

    seen, cancelled, answered, truncated, err, played_ms = run(go())
    kinds = [e["type"] for e in seen]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    resp = cancelled["response"]
    assert resp["status"] == "cancelled" and resp["status_details"]["reason"] == "turn_detected"
    item = resp["output"][0]
    assert item["status"] == "incomplete"
    first = [e for e in seen if e.get("response_id") == resp["id"]]
    audio = b"".join(base64.b64decode(e["delta"]) for e in first if e["type"] == "response.output_audio.delta")
    streamed = "".join(e["delta"] for e in first if e["type"] == "response.output_audio_transcript.delta")
    heard = item["content"][0]["transcript"]
    assert streamed.startswith(heard) and len(audio) > 0
    assert answered["response"]["status"] in ("completed", "incomplete")
    # the new turn's prompt: the first question, the reply as heard, the committed speech
    a = of(seen, "input_audio_buffer.speech_started")[0]["audio_start_ms"]
    b = of(seen, "input_audio_buffer.speech_stopped")[0]["audio_end_ms"]
    turn = (silence(200) + spoken + silence(1000))[a * 48 : b * 48]
    audio = load_audio(wav_header(len(turn), RATE) + turn)
    context = ChatRequest(
        [Message("user", "Tell me a long story."), Message("assistant", heard), Message("user", [AudioPart(audio)])],
        speak=True,
    )
    prompt = prepare_prompt(pipeline.processor, context)
    assert answered["response"]["usage"]["input_tokens"] == prompt.input_ids.shape[0]
    assert truncated["item_id"] == item["id"] and truncated["audio_end_ms"] == played_ms
    assert err["error"]["param"] == "audio_end_ms" and err["error"]["code"] == "invalid_value"
    idle(server, pipeline)


# ---------------------------------------------------------------------------------------------------- 16 sessions
N_SESSIONS = 16
N_TURNS = 2
CONCURRENT_DEADLINE = 300  # seconds for all of them: a hang fails here instead of blocking the suite
SHORT_SPOKEN_REPLIES = {  # manual turns, replies of a few text and codec tokens
    "output_modalities": ["audio"],
    "max_output_tokens": 4,
    "max_output_audio_tokens": 30,
    "audio": {"input": {"turn_detection": None}},
}


def slots_in_use(server, pipeline) -> dict[str, int]:
    """Per engine, KV slots reserved (busy) and rows running; the admission's held slots. Read on the server's loop."""
    routes = server.server.config.app.state.routes

    async def read() -> dict[str, int]:
        out = {"admission": routes.admission.active}
        for stage in ("thinker", "talker"):
            engine = getattr(pipeline, stage).engine
            out[f"{stage}_kv_busy"], out[f"{stage}_running"] = engine.kv.busy, engine.num_running
        return out

    return server.call(read())


def test_16_concurrent_sessions_complete_their_turns_and_free_everything(server, pipeline, spoken):
    """16 SDK sessions at once, each 2 spoken turns (manual commits) answered with a little speech: every response
    completes with audio and no error event; the active-sessions gauge reads 16 more while they are all open; after
    they close no slot is held in any engine or the admission, and the gauge is back where it was."""
    idle(server, pipeline)
    slots_before = slots_in_use(server, pipeline)
    all_open = asyncio.Event()
    opened = []

    async def session(k: int) -> list[dict]:
        async with sdk(server) as conn:
            await setup(conn, **SHORT_SPOKEN_REPLIES)
            opened.append(k)
            if len(opened) == N_SESSIONS:
                all_open.set()
            await asyncio.wait_for(all_open.wait(), DEADLINE)
            done = []
            for _ in range(N_TURNS):
                seen = []
                await append(conn, spoken)
                await conn.input_audio_buffer.commit()
                await until(conn, "input_audio_buffer.committed", seen)
                await conn.response.create()
                done.append(await until(conn, "response.done", seen))
                assert of(seen, "response.output_audio.delta"), f"session {k}: a reply without audio"
            return done

    async def go():
        before = await scrape(server)
        tasks = [asyncio.ensure_future(session(k)) for k in range(N_SESSIONS)]
        opening = asyncio.ensure_future(all_open.wait())  # or a session's failure, which gather then raises
        await asyncio.wait([opening, *tasks], timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        opening.cancel()
        during = await scrape(server)
        results = await asyncio.wait_for(asyncio.gather(*tasks), CONCURRENT_DEADLINE)
        after = await sessions_back_to(server, before[SESSIONS])
        return before, during, after, results

    before, during, after, results = asyncio.run(go())
    assert during[SESSIONS] == before[SESSIONS] + N_SESSIONS
    statuses = [d["response"]["status"] for done in results for d in done]
    assert len(statuses) == N_SESSIONS * N_TURNS and set(statuses) <= {"completed", "incomplete"}, statuses
    assert moved(before, after)[TURNS + "_count"] == N_SESSIONS * N_TURNS
    idle(server, pipeline)
    assert slots_in_use(server, pipeline) == slots_before


def test_readme_realtime_example_runs(server, spoken):
    """The README's Realtime SDK example, as written (only its address and key changed), on a spoken question."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("### Realtime: `/v1/realtime`") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and 'api_key="unused"' in code
    code = code.replace("http://127.0.0.1:8000", server.url).replace('api_key="unused"', f'api_key="{KEY}"')
    code = code.replace('model="tiny"', f'model="{MODEL}"')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    speech = run(scope["main"](silence(300) + spoken))
    assert len(speech) > 0 and len(speech) % 2 == 0
