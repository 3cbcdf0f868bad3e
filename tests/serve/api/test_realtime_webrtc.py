"""WebRTC for the Realtime API (POST /v1/realtime/calls) on a real uvicorn server in front of the in-process Pipeline
(tiny; the server and the spoken question are test_realtime.py's fixtures), called by a real aiortc peer as a
browser would: its microphone track plays the espeak-ng question then silence, its `oai-events` data channel carries
the events; the offer goes as `application/sdp` with a client secret (the browser's fetch) or through the official
SDK (`client.realtime.calls.create`, multipart with a session)."""

import asyncio
import base64
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

aiortc = pytest.importorskip("aiortc")

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402

from omni.serve.api.realtime_webrtc_peer import Speaker  # noqa: E402

from . import test_realtime as rt  # noqa: E402
from .test_realtime import DEADLINE, KEY, TALKER_TOKENS, idle, run, silence  # noqa: E402

server, spoken = rt.server, rt.spoken  # test_realtime's fixtures: its server settings, its espeak-ng question

SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "max_output_tokens": 8,
    "max_output_audio_tokens": TALKER_TOKENS,
    "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 600}}},
}


class Peer:
    """The client: a microphone track (test_realtime's PCM16 24 kHz, then silence; paced in real time by the server's
    own Speaker class), the oai-events channel, and the frames of the server's audio track as (time, peak)."""

    def __init__(self, pcm24: bytes = b""):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = Speaker(lambda ev: None)
        if pcm24:
            self.mic.push("mic", "mic", pcm24)
            self.mic.finish()
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: asyncio.Queue = asyncio.Queue()
        self.seen: list[dict] = []
        self.frames: list[tuple[float, int]] = []
        self.tick = asyncio.Event()  # a frame arrived
        self.channel.on("message", lambda raw: self.events.put_nowait(json.loads(raw)))
        self.pc.on("track", lambda track: asyncio.ensure_future(self._play(track)))

    async def _play(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except aiortc.mediastreams.MediaStreamError:
                return
            self.frames.append((time.monotonic(), int(np.abs(frame.to_ndarray().astype(np.int32)).max())))
            self.tick.set()

    async def play_until(self, t: float) -> None:
        """Wait until the server's track has played past monotonic time `t`."""
        while not self.frames or self.frames[-1][0] <= t:
            self.tick.clear()
            await asyncio.wait_for(self.tick.wait(), DEADLINE)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def until(self, kind: str) -> dict:
        while True:
            try:
                ev = await asyncio.wait_for(self.events.get(), DEADLINE)
            except asyncio.TimeoutError:
                raise AssertionError(f"no {kind} in {DEADLINE} s; got {[e['type'] for e in self.seen][-30:]}") from None
            ev["_t"] = time.monotonic()
            self.seen.append(ev)
            if ev["type"] == kind:
                return ev
            assert ev["type"] != "error", (ev, [e["type"] for e in self.seen][-30:])

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.seen if e["type"] == kind]

    def send(self, **event) -> None:
        self.channel.send(json.dumps(event))


async def post_offer(server, peer: Peer, bearer: str) -> httpx.Response:
    """POST /v1/realtime/calls with the peer's offer as application/sdp, as a browser's fetch sends it."""
    async with httpx.AsyncClient(timeout=DEADLINE) as http:
        return await http.post(
            f"{server.url}/v1/realtime/calls",
            content=await peer.offer(),
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/sdp"},
        )


def calls_of(server) -> dict:
    return server.server.config.app.state.realtime_calls


def gone(server, pipeline) -> None:
    """Wait (bounded) until the server holds no call, then until no stage runs a request and no slot is held."""
    deadline = time.time() + DEADLINE
    while calls_of(server):
        assert time.time() < deadline, f"calls still open: {list(calls_of(server))}"
        time.sleep(0.05)
    idle(server, pipeline)


def test_a_spoken_turn_over_webrtc(server, pipeline, spoken):
    """The browser's flow: a client secret (its session configures the call), the SDP offer posted as
    application/sdp, the answer set; the question spoken into the microphone track is a VAD turn answered with
    speech on the server's audio track (not as audio events) and the transcript on the data channel."""

    async def go():
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        secret = await sdk.realtime.client_secrets.create(session=SESSION)
        peer = Peer(silence(400) + spoken + silence(1500))
        r = await post_offer(server, peer, secret.value)
        assert r.status_code == 201, r.text
        assert r.headers["access-control-allow-origin"] == "*"  # a page of another origin reads the answer
        assert r.headers["content-type"].startswith("application/sdp") and r.text.startswith("v=0")
        call_id = re.fullmatch(r"/v1/realtime/calls/(rtc_\w+)", r.headers["location"]).group(1)
        await peer.answer(r.text)
        created = await peer.until("session.created")
        assert call_id in calls_of(server)
        created_at = (await peer.until("response.created"))["_t"]
        done = await peer.until("response.done")
        await peer.until("output_audio_buffer.stopped")  # the reply's audio played out on the track
        await peer.pc.close()
        return peer, created, created_at, done

    peer, created, created_at, done = run(go())
    assert created["session"]["max_output_tokens"] == 8  # the secret's session
    assert created["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 600
    kinds = [e["type"] for e in peer.seen]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    order += ["response.created", "response.done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    assert len(peer.of("input_audio_buffer.speech_started")) == 1
    a, b = (
        peer.of("input_audio_buffer.speech_started")[0]["audio_start_ms"],
        peer.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"],
    )
    assert 0 < a < 400 + 300 and a + 1000 < b, (a, b)  # the question, found in the decoded RTP audio
    # the random tiny Thinker rarely ends on its own: max_output_tokens (8) ends it, "incomplete"; never cancelled
    assert done["response"]["status"] in ("completed", "incomplete"), done
    transcript = "".join(e["delta"] for e in peer.of("response.output_audio_transcript.delta"))
    assert transcript and transcript == peer.of("response.output_audio_transcript.done")[0]["transcript"]
    assert not peer.of("response.output_audio.delta")  # audio goes over RTP only
    started = peer.of("output_audio_buffer.started")
    assert [e["response_id"] for e in started] == [done["response"]["id"]]
    loud = [t for t, peak in peer.frames if peak > 0 and t >= created_at]
    assert len(loud) >= 10, f"{len(loud)} frames with sound after response.created"  # >= 200 ms of the reply
    gone(server, pipeline)


def test_bad_offers_and_credentials(server):
    """A bad SDP or session is a 400 with OpenAI's error body, no or a wrong credential a 401; nothing is left open."""

    async def go():
        no_audio = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        no_audio.createDataChannel("oai-events")
        await no_audio.setLocalDescription(await no_audio.createOffer())
        url, auth = f"{server.url}/v1/realtime/calls", {"Authorization": f"Bearer {KEY}"}
        sdp = {"Content-Type": "application/sdp"}
        async with httpx.AsyncClient(timeout=DEADLINE) as http:
            out = [
                await http.post(url, content="hello", headers={**auth, **sdp}),
                await http.post(url, content=no_audio.localDescription.sdp, headers={**auth, **sdp}),
                await http.post(url, content="v=0\r\n", headers={**auth, "Content-Type": "image/png"}),
                await http.post(url, content="v=0\r\n", headers=sdp),
                await http.post(url, content="v=0\r\n", headers={"Authorization": "Bearer ek_forged.sig", **sdp}),
                await http.post(f"{url}/rtc_nope/hangup", headers=auth),
            ]
            preflight = await http.options(
                url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            )
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as bad_session:
            await sdk.realtime.calls.create(sdp="v=0\r\n", session={"type": "realtime", "output_modalities": ["video"]})
        await no_audio.close()
        assert all(r.headers["access-control-allow-origin"] == "*" for r in out)  # errors a page can read
        return [(r.status_code, r.json()["error"]) for r in out], bad_session.value, preflight

    out, bad_session, preflight = run(go())
    assert preflight.status_code == 204 and "Authorization" in preflight.headers["access-control-allow-headers"]
    assert [s for s, _ in out] == [400, 400, 400, 401, 401, 404]
    assert out[0][1] == {
        "message": "sdp must be an SDP offer (text starting with v=0)",
        "type": "invalid_request_error",
        "param": "sdp",
        "code": "invalid_offer",
    }
    assert out[1][1]["code"] == "invalid_offer" and "no audio media section" in out[1][1]["message"]
    assert out[2][1]["param"] == "Content-Type"
    assert out[3][1]["code"] == out[4][1]["code"] == "invalid_api_key"
    assert out[5][1]["code"] == "call_not_found"
    assert bad_session.status_code == 400 and bad_session.body["param"] == "session.output_modalities"
    assert not calls_of(server)


def test_closing_the_peer_mid_response_frees_everything(server, pipeline):
    """The official SDK's calls.create (multipart, with a session); a long spoken reply asked for on the data
    channel; the peer closes while it streams: the call ends, the response is cancelled in every stage, no slot is
    held. A second call, its offer without ICE candidates (as a browser's that does not wait for gathering: the
    server learns the client's address from its connectivity checks), ended by the SDK's calls.hangup, is gone too."""
    long = {"type": "realtime", "instructions": "Be long.", "max_output_tokens": 400, "max_output_audio_tokens": 2000}

    async def go():
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        peer = Peer()
        answer = await sdk.realtime.calls.with_raw_response.create(sdp=await peer.offer(), session=long)
        assert answer.http_response.status_code == 201
        await peer.answer(answer.http_response.text)
        created = await peer.until("session.created")
        peer.send(
            type="conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Talk for a while."}]},
        )
        peer.send(type="response.create")
        await peer.until("output_audio_buffer.started")
        await peer.pc.close()  # gone mid-reply

        other = Peer()  # a browser posts its offer before ICE gathering ends: no candidates in it (trickle ICE)
        bare = "".join(line for line in (await other.offer()).splitlines(True) if "candidate" not in line)
        answer = await sdk.realtime.calls.with_raw_response.create(sdp=bare)
        call_id = answer.http_response.headers["location"].rsplit("/", 1)[1]
        await other.answer(answer.http_response.text)
        await other.until("session.created")
        await sdk.realtime.calls.hangup(call_id)
        assert call_id not in calls_of(server)
        await other.pc.close()
        return created

    created = run(go())
    assert created["session"]["instructions"] == "Be long."
    gone(server, pipeline)


async def lifespan(app) -> list[str]:
    """The ASGI lifespan protocol as a server runs it around its life (startup, then shutdown at stop), on `app`;
    -> the message types the app sent back."""
    incoming: asyncio.Queue = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        incoming.put_nowait({"type": kind})
    sent: list[str] = []

    async def send(message: dict) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}, incoming.get, send)
    return sent


def test_the_app_shutdown_hangs_up_every_call(server, pipeline):
    """The app's shutdown (ASGI lifespan, as uvicorn and Serve's ingress run it when they stop) ends every call in
    progress at once, as a hangup: the peer's channel closes and nothing stays held. Without it a server with a call
    open waits for the peer's ICE consent to expire (~30 s) before it stops."""

    async def go():
        peer = Peer()
        r = await post_offer(server, peer, KEY)
        assert r.status_code == 201, r.text
        await peer.answer(r.text)
        await peer.until("session.created")
        assert len(calls_of(server)) == 1
        t0 = time.monotonic()
        sent = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(lifespan(server.server.config.app), server.loop)
        )
        took = time.monotonic() - t0
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"], sent
        while peer.channel.readyState != "closed":  # the server's side closed: the peer learns it
            assert time.monotonic() - t0 < DEADLINE, peer.channel.readyState
            await asyncio.sleep(0.05)
        await peer.pc.close()
        return took

    took = run(go())
    assert took < 10 and not calls_of(server), (took, calls_of(server))
    gone(server, pipeline)


def test_speech_over_the_reply_stops_it_and_cuts_it_to_what_was_played(server, pipeline, spoken):
    """Barge-in over WebRTC: the client speaks while a long spoken reply plays on the track; the server drops the
    queued audio (output_audio_buffer.cleared, silence on the track), and cuts the assistant item to what was played
    (conversation.item.truncated), as OpenAI's WebRTC does without the client's truncate."""
    session = {
        "type": "realtime",
        "max_output_tokens": 100,
        "max_output_audio_tokens": 500,  # 10 s of speech: still playing when the user speaks
        "audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": False}}},
    }

    async def go():
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        peer = Peer()
        answer = await sdk.realtime.calls.with_raw_response.create(sdp=await peer.offer(), session=session)
        await peer.answer(answer.http_response.text)
        await peer.until("session.created")
        peer.send(
            type="conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]},
        )
        peer.send(type="response.create")
        created = await peer.until("response.created")
        started = (await peer.until("output_audio_buffer.started"))["_t"]
        peer.mic.push("mic", "again", silence(300) + spoken + silence(800))  # the user talks over the reply
        peer.mic.finish()
        await peer.until("input_audio_buffer.speech_started")
        cleared = await peer.until("output_audio_buffer.cleared")
        truncated = await peer.until("conversation.item.truncated")
        await peer.until("input_audio_buffer.committed")
        await peer.play_until(cleared["_t"] + 1.5)
        await peer.pc.close()
        return peer, created, started, cleared, truncated

    peer, created, started, cleared, truncated = run(go())
    rid = created["response"]["id"]
    assert cleared["response_id"] == rid
    item = [e["item"] for e in peer.of("response.output_item.added") if e["response_id"] == rid][0]
    assert truncated["item_id"] == item["id"], [(e["type"], e.get("item", {}).get("role")) for e in peer.seen]
    heard_s = cleared["_t"] - started
    assert 0 < truncated["audio_end_ms"] <= 1000 * heard_s + 500, (truncated, heard_s)  # played, not generated
    done = [e for e in peer.of("response.done") if e["response"]["id"] == rid]
    assert not done or done[0]["response"]["status"] in ("cancelled", "completed", "incomplete")
    after = [peak for t, peak in peer.frames if t > cleared["_t"] + 0.5]  # past the jitter buffer: silence
    assert after and max(after) == 0, after
    gone(server, pipeline)


def test_a_silent_microphone_never_fills_the_input_buffer(server, spoken):
    """A call's microphone streams for as long as the call lasts, mostly silence: with server VAD the session keeps
    only what a turn may reach back to, so 70 s of silence (past realtime.max_buffer_s, 60) then a question is one
    turn and no input_audio_buffer_full error. Driven over the WebSocket (the same Session), where the audio can be
    sent faster than real time."""

    async def go():
        async with rt.sdk(server) as conn:
            await rt.setup(conn, audio={"input": {"turn_detection": {"type": "server_vad", "create_response": False}}})
            seen: list = []
            second = base64.b64encode(silence(1000)).decode()
            for _ in range(70):
                await conn.input_audio_buffer.append(audio=second)
            await rt.append(conn, spoken + silence(1000))
            await rt.until(conn, "input_audio_buffer.committed", seen)
            return seen

    seen = run(go())
    started = rt.of(seen, "input_audio_buffer.speech_started")
    assert len(started) == 1 and started[0]["audio_start_ms"] >= 70000 - 300, started


# the README's browser code, as written there (only the address and the secret filled in), plus what the test reads:
# the data channel's events and the peak level of the reply's audio track (WebAudio)
PAGE = """<html><body><script>
window.events = []; window.peaks = []; window.state = "start";
(async () => { try {
%(readme)s
  pc.onconnectionstatechange = () => { window.state += " " + pc.connectionState; };
  events.onmessage = (e) => { const ev = JSON.parse(e.data); window.events.push([performance.now(), ev.type,
    ev.response ? ev.response.status : null]); };
  window.state = "answer " + r.status;
  const ctx = new AudioContext(), analyser = ctx.createAnalyser(), wave = new Float32Array(2048);
  ctx.createMediaStreamSource(speaker.srcObject).connect(analyser);
  setInterval(() => { analyser.getFloatTimeDomainData(wave);
    window.peaks.push([performance.now(), Math.max(...wave.map(Math.abs))]); }, 50);
} catch (e) { window.state = "error " + e; } })();
</script></body></html>"""


def test_headless_chromium_calls_it_as_the_readme_says(server, spoken, tmp_path):
    """A real browser: headless Chromium, its fake microphone playing the espeak-ng question, runs the README's
    WebRTC code from a file:// page (another origin: CORS) with a client secret; Chrome's own offer (trickle ICE, no
    candidates in it) connects, the question is a VAD turn, the reply is heard on the track (WebAudio peaks)."""
    pytest.importorskip("selenium")
    import shutil

    import soundfile as sf
    import soxr
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (make setup installs them)")
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    js = re.search(r"```js\n(.*?)```", readme[readme.index("**WebRTC**") :], re.S).group(1)
    secret = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY).realtime.client_secrets.create(session=SESSION)
    js = js.replace("http://127.0.0.1:8000", server.url).replace("${secret}", secret.value)
    (tmp_path / "page.html").write_text(PAGE % {"readme": js})
    pcm = np.frombuffer(silence(300) + spoken + silence(6000), "<i2")  # Chromium plays it in a loop
    sf.write(tmp_path / "mic.wav", soxr.resample(pcm, 24000, 48000).astype(np.int16), 48000, subtype="PCM_16")

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio"):
        options.add_argument(arg)
    options.add_argument("--autoplay-policy=no-user-gesture-required")
    options.add_argument("--use-fake-ui-for-media-stream")
    options.add_argument("--use-fake-device-for-media-stream")
    options.add_argument(f"--use-file-for-fake-audio-capture={tmp_path / 'mic.wav'}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"file://{tmp_path / 'page.html'}")
        deadline = time.time() + 2 * DEADLINE
        while True:  # polling the page: the browser's state is only seen from here by asking it
            state, events, peaks = driver.execute_script("return [window.state, window.events, window.peaks]")
            done = [t for t, kind, _ in events if kind == "response.done"]
            if done and any(t > done[0] + 500 for t, _ in peaks) or state.startswith("error"):
                break
            assert time.time() < deadline, (state, [k for _, k, _ in events])
            time.sleep(0.2)
    finally:
        driver.quit()  # the call stays open (until ICE consent expires, ~30 s): the module server's stop hangs it up
    kinds = [k for _, k, _ in events]
    assert state.startswith("answer 201") and "connected" in state, state
    order = ["session.created", "input_audio_buffer.speech_started", "input_audio_buffer.committed"]
    order += ["response.created", "output_audio_buffer.started", "response.done"]
    assert all(k in kinds for k in order), kinds
    assert [s for _, k, s in events if k == "response.done"][0] in ("completed", "incomplete")
    created = next(t for t, k, _ in events if k == "response.created")
    assert max(p for t, p in peaks if t > created) > 0.01  # the reply, heard in the browser
