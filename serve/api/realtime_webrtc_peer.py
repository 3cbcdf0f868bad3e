"""The aiortc side of a WebRTC realtime call (serve/api/realtime_webrtc.py serves the endpoint): one peer connection
and one realtime Session (realtime_session.py, the WebSocket's), with the session's `emit` as the transport seam.

In: the client's microphone, an Opus RTP track that aiortc decodes, resampled to 24 kHz PCM16 mono and fed to the
session as `input_audio_buffer.append` in 100 ms pieces (server VAD turns as on the socket); the client's events on
the `oai-events` data channel, read as the socket's are (handle_raw: rate and size limits, `error` events).
Out: the reply's audio as an RTP track (`Speaker`: 20 ms frames at 48 kHz from a queue, silence when idle), not as
`response.output_audio.delta` events; every other server event as JSON on the data channel (queued until it opens).
The server knows what was played, as OpenAI's WebRTC does: `output_audio_buffer.started` / `stopped` / `cleared`,
and speech that interrupts the reply (or the client's `output_audio_buffer.clear`) drops the queued audio and cuts
the assistant item to what was played (`conversation.item.truncated`), so the next turn's context is what was heard.

aiortc is the `webrtc` extra; only realtime_webrtc.py imports this module, lazily."""

from __future__ import annotations

import asyncio
import base64
import fractions
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

import av
import numpy as np
import soxr
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from omni.serve.api.common import HTTPError
from omni.serve.api.realtime import _Bucket, handle_raw
from omni.serve.api.realtime_events import RealtimeError, SessionConfig, error_event, new_id, server_event
from omni.serve.api.realtime_session import Session

__all__ = ["Call", "Speaker"]

log = logging.getLogger("omni.serve.api.realtime")

RATE_IN = 24000  # the session's PCM16
RATE_OUT = 48000  # Opus' clock
FRAME = 960  # 20 ms at 48 kHz
APPEND_BYTES = 4800  # 100 ms of 24 kHz PCM16 per input_audio_buffer.append
CONNECT_TIMEOUT_S = 30  # the answer given, ICE and DTLS must complete within this
MAX_PENDING = 1000  # server events held for a data channel not open yet (a client without one: the rest dropped)


class Speaker(MediaStreamTrack):
    """The reply's audio as an RTP source: 20 ms frames of 48 kHz PCM16 mono from a queue, paced in real time (as
    aiortc's own AudioStreamTrack), silence when the queue is empty. `push` takes 24 kHz PCM16 per (response, item);
    `on_event` gets the output_audio_buffer.* server events."""

    kind = "audio"

    def __init__(self, on_event: Callable[[dict], None]):
        super().__init__()
        self.on_event = on_event
        self.buffer = bytearray()  # 48 kHz PCM16 queued
        self.segments: deque[list[Any]] = deque()  # [response id, item id, bytes queued], in play order
        self.source: Optional[tuple[str, str]] = None  # the (response, item) being resampled
        self.resampler: Optional[soxr.ResampleStream] = None
        self.playing: Optional[str] = None  # the response whose output_audio_buffer.started went out
        self.played: tuple[Optional[str], int] = (None, 0)  # (item id, 48 kHz samples of it played)
        self._start: Optional[float] = None
        self._pts = 0

    def push(self, response_id: str, item_id: str, pcm24: bytes) -> None:
        if self.source != (response_id, item_id):
            self.finish()
            self.source = (response_id, item_id)
            self.resampler = soxr.ResampleStream(RATE_IN, RATE_OUT, 1, dtype="int16")
        assert self.resampler is not None
        self._queue(self.resampler.resample_chunk(np.frombuffer(pcm24, "<i2")))

    def finish(self) -> None:
        """The audio being resampled is complete: queue the resampler's tail."""
        if self.source is not None and self.resampler is not None:
            self._queue(self.resampler.resample_chunk(np.zeros(0, np.int16), last=True))
        self.source, self.resampler = None, None

    def _queue(self, samples: np.ndarray) -> None:
        if not len(samples) or self.source is None:
            return
        self.buffer += samples.astype("<i2").tobytes()
        rid, iid = self.source
        if self.segments and self.segments[-1][1] == iid:
            self.segments[-1][2] += 2 * len(samples)
        else:
            self.segments.append([rid, iid, 2 * len(samples)])

    def clear(self) -> Optional[tuple[str, int]]:
        """Drop what is queued -> (item id, ms of it played) of the audio cut short; None when nothing was."""
        head = self.segments[0][1] if self.segments else self.source[1] if self.source else None
        self.buffer.clear()
        self.segments.clear()
        self.source, self.resampler = None, None
        if self.playing is not None:
            self.on_event(server_event("output_audio_buffer.cleared", response_id=self.playing))
            self.playing = None
        if head is None:
            return None
        item, samples = self.played
        return head, (samples if item == head else 0) * 1000 // RATE_OUT

    def _take(self, n: int) -> bytes:
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        left = len(out)
        while left and self.segments:
            rid, iid, queued = self.segments[0]
            if self.playing != rid:
                self.playing = rid
                self.on_event(server_event("output_audio_buffer.started", response_id=rid))
            k = min(left, queued)
            item, samples = self.played
            self.played = (iid, (samples if item == iid else 0) + k // 2)
            left -= k
            self.segments[0][2] -= k
            if self.segments[0][2] == 0:
                self.segments.popleft()
        if self.playing is not None and not self.segments and (self.source is None or self.source[0] != self.playing):
            self.on_event(server_event("output_audio_buffer.stopped", response_id=self.playing))
            self.playing = None
        return out + bytes(n - len(out))

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        else:
            self._pts += FRAME
            wait = self._start + self._pts / RATE_OUT - time.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the frame's due time: real-time pacing, as aiortc's AudioStreamTrack
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(self._take(2 * FRAME))
        frame.pts, frame.sample_rate, frame.time_base = self._pts, RATE_OUT, fractions.Fraction(1, RATE_OUT)
        return frame


class Call:
    """One WebRTC call: `open(offer)` -> the answer; then a loop that feeds the session one event at a time (the
    client's, the microphone's, the server's own truncations) until the peer connection closes or fails, the client
    hangs up, ICE does not connect within CONNECT_TIMEOUT_S, or the session reaches realtime.max_session_s."""

    def __init__(self, routes, registry: dict[str, Call]):
        self.routes, self.registry = routes, registry
        self.limits = routes.settings.realtime
        self.id = new_id("rtc")
        self.session = Session(routes, self.emit, SessionConfig())
        self.speaker = Speaker(self.send)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates: the server is reachable
        self.channel: Any = None  # the client's oai-events RTCDataChannel, once it arrives
        self.pending: list[dict] = []  # server events before the channel opened
        self.inbox: asyncio.Queue = asyncio.Queue()  # (kind, payload): client / audio / truncate / end
        self.buffer_full = False  # an input_audio_buffer_full error was sent (once, until an append fits again)
        self.task: Optional[asyncio.Task] = None
        self.tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------------------------- signalling
    async def open(self, sdp: str, patches: list[dict]) -> str:
        """Configure the session, answer the offer; -> the SDP answer. HTTPError 400 for a bad session or offer."""
        try:
            cfg = SessionConfig()
            for patch in patches:
                cfg = self.session.check_config(cfg.updated(patch, "session"))
            self.session.config = cfg
        except RealtimeError as e:
            await self.pc.close()
            raise HTTPError(400, e.message, e.param, e.code) from None
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_channel)
        pc.on("connectionstatechange", self._on_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            if not any(t.kind == "audio" for t in pc.getTransceivers()):
                raise ValueError("the offer has no audio media section (m=audio)")
            pc.addTrack(self.speaker)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # noqa: BLE001 - aiortc's SDP parser raises ValueError, KeyError, IndexError, ...
            await pc.close()
            raise HTTPError(400, f"invalid SDP offer: {e or type(e).__name__}", "sdp", "invalid_offer") from None
        try:
            await self.session.start()
        except BaseException:
            await pc.close()
            raise
        self.session.expires_at = int(time.time() + self.limits.max_session_s)
        self.registry[self.id] = self
        self.send(server_event("session.created", session=self.session.wire()))
        self.task = asyncio.ensure_future(self._run())
        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self._check_connected)
        return pc.localDescription.sdp

    def _check_connected(self) -> None:
        if self.pc.connectionState not in ("connected", "closed"):
            self.inbox.put_nowait(("end", "ICE did not connect"))

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.inbox.put_nowait(("end", f"peer connection {self.pc.connectionState}"))

    def _on_channel(self, channel) -> None:
        if channel.label != "oai-events" or self.channel is not None:
            return
        self.channel = channel
        channel.on("message", lambda raw: self.inbox.put_nowait(("client", raw)))
        channel.on("open", self._flush)
        self._flush()

    def _flush(self) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            pending, self.pending = self.pending, []
            for ev in pending:
                self.channel.send(json.dumps(ev))

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            task = asyncio.ensure_future(self._listen(track))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _listen(self, track) -> None:
        """The microphone: decoded frames -> 24 kHz PCM16 mono -> the inbox, 100 ms at a time."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE_IN)
        pcm = bytearray()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                pcm += out.to_ndarray().tobytes()
            if len(pcm) >= APPEND_BYTES:
                self.inbox.put_nowait(("audio", bytes(pcm)))
                pcm.clear()

    # ---------------------------------------------------------------------------------------------- events
    def send(self, ev: dict) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(ev))
        elif self.channel is None and len(self.pending) < MAX_PENDING:
            self.pending.append(ev)

    def emit(self, ev: dict) -> None:
        """The session's output: audio to the Speaker, the rest to the data channel."""
        kind = ev["type"]
        if kind == "response.output_audio.delta":
            self.speaker.push(ev["response_id"], ev["item_id"], base64.b64decode(ev["delta"]))
            return
        if kind == "response.output_audio.done":
            self.speaker.finish()
        self.send(ev)
        td = self.session.config.turn_detection
        if kind == "input_audio_buffer.speech_started" and td is not None and td.interrupt_response:
            self._cut()

    def _cut(self) -> None:
        """Stop the reply's audio; its item is cut to what was played once the session is free (the inbox)."""
        cut = self.speaker.clear()
        if cut is not None:
            self.inbox.put_nowait(("truncate", cut))

    async def _run(self) -> None:
        bucket = _Bucket(self.limits.max_events_per_s)
        deadline = time.monotonic() + self.limits.max_session_s
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(self.inbox.get(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    msg = f"the session reached its maximum length of {self.limits.max_session_s} s"
                    self.send(error_event(RealtimeError(msg, None, "session_expired")))
                    return
                if kind == "end":
                    log.info("realtime call %s ended: %s", self.id, payload)
                    return
                if kind == "client":
                    await self._client_event(payload, bucket)
                elif kind == "audio":
                    await self._append(payload)
                elif kind == "truncate":
                    await self._truncate(*payload)
        finally:
            await self._close()

    async def _client_event(self, raw, bucket: _Bucket) -> None:
        if isinstance(raw, str) and "output_audio_buffer.clear" in raw:  # the one client event of WebRTC alone
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = None
            if isinstance(ev, dict) and ev.get("type") == "output_audio_buffer.clear":
                self._cut()
                return
        await handle_raw(self.session, raw, bucket, self.limits, self.emit)

    async def _append(self, pcm: bytes) -> None:
        try:
            await self.session.handle({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
            self.buffer_full = False
        except RealtimeError as e:  # the buffer is full (no VAD, no commit): said once
            if not self.buffer_full:
                self.emit(error_event(e))
            self.buffer_full = e.code == "input_audio_buffer_full"

    async def _truncate(self, item_id: str, ms: int) -> None:
        ev = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": ms}
        try:
            await self.session.handle(ev)
        except RealtimeError as e:  # the item is gone or has no audio: nothing to cut
            log.debug("realtime call %s: no truncation of %s: %s", self.id, item_id, e.message)

    async def hangup(self) -> None:
        self.inbox.put_nowait(("end", "hung up"))
        if self.task is not None:
            await asyncio.shield(self.task)

    async def _close(self) -> None:
        self.registry.pop(self.id, None)
        try:
            await self.session.close()
        finally:
            self.speaker.stop()
            for task in list(self.tasks):
                task.cancel()
            await self.pc.close()
