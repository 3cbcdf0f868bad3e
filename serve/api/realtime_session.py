"""One /v1/realtime session: the conversation (items), the session configuration, the input audio buffer with its
server VAD, and at most one response at a time (serve/api/realtime_response.py, its base class). Client events come
in through `handle(event)` one at a time; server events go out through `emit` (a queue that one writer task drains to
the socket, so a cancelled response never cuts an event in half). /metrics: the active sessions (from `start` to
`close`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Optional

from starlette.concurrency import run_in_threadpool

from omni.types import AudioPart, ImagePart, InvalidRequest, TextPart
from omni.serve.api.convert import resolve_voice
from omni.serve.api.realtime_events import (
    MIN_COMMIT_MS,
    SAMPLES_PER_MS,
    Item,
    RealtimeError,
    SessionConfig,
    decode_pcm16,
    new_id,
    pcm16_to_wav_24k,
    server_event,
)
from omni.serve.api.realtime_response import Response, Responses
from omni.serve.api.realtime_vad import ServerVad, silero_model

__all__ = ["Session"]


class Session(Responses):
    def __init__(self, routes, emit: Callable[[dict], None], config: SessionConfig):
        self.routes, self.emit = routes, emit
        self.backend, self.limits = routes.backend, routes.settings.realtime
        self.id = new_id("sess")
        self.config = config
        self.items: list[Item] = []
        self.buffer = bytearray()  # uncommitted PCM16 24 kHz
        self.buffer_start = 0  # session audio samples before buffer[0]
        self.vad: Optional[ServerVad] = None
        self.speech_item: Optional[str] = None  # the item id announced by speech_started
        self.speech_start_ms = 0
        self.response: Optional[Response] = None
        self.responses = 0  # created in this session
        self.metrics = routes.metrics
        self.committed_at: Optional[float] = None  # perf_counter of the last commit no response has answered yet
        self._counted = False  # in the active-sessions gauge

    # ------------------------------------------------------------------------------------------------ setup
    async def start(self) -> None:
        if not self._counted:
            self._counted = True
            self.metrics.realtime_sessions.inc()
        await self._apply_turn_detection()

    async def _apply_turn_detection(self) -> None:
        td = self.config.turn_detection
        if td is None:
            self.vad = None
        elif self.vad is None:
            model = await run_in_threadpool(silero_model)
            self.vad = ServerVad(td, model)
            self.vad.offset_ms = self._samples_total() / SAMPLES_PER_MS
        else:
            self.vad.config = td

    def _samples_total(self) -> int:
        return self.buffer_start + len(self.buffer) // 2

    def check_config(self, cfg: SessionConfig) -> SessionConfig:
        voices = self.backend.voices
        if "audio" in cfg.output_modalities and not voices:
            raise RealtimeError(
                "this model has no speech output: use output_modalities [\"text\"]",
                "session.output_modalities",
                "invalid_value",
            )
        voice = resolve_voice(cfg.voice, voices) if voices else cfg.voice
        if voices and voice not in voices:
            raise RealtimeError(
                f"unknown voice {cfg.voice!r}; this model's voices: {', '.join(voices)}",
                "session.audio.output.voice",
                "invalid_value",
            )
        return replace(cfg, voice=voice)

    # ------------------------------------------------------------------------------------------------ dispatch
    async def handle(self, ev: dict) -> None:
        kind = ev.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise RealtimeError(
                f"unknown event type {kind!r}; supported: {', '.join(sorted(_HANDLERS))}", "type", "invalid_event_type"
            )
        await handler(self, ev)

    async def session_update(self, ev: dict) -> None:
        cfg = self.check_config(self.config.updated(ev.get("session"), "session"))
        self.config = cfg
        await self._apply_turn_detection()
        self.emit(server_event("session.updated", session=self.wire()))

    def wire(self) -> dict:
        return self.config.wire(self.id, self.routes.served_name, self.expires_at)

    expires_at = 0  # set by the connection

    # ------------------------------------------------------------------------------------------------ input audio
    async def audio_append(self, ev: dict) -> None:
        raw = decode_pcm16(ev.get("audio"), "audio")
        if self.vad is not None and self.speech_item is None and not self.vad.in_speech:
            self._drop_idle_audio()
        if (len(self.buffer) + len(raw)) / 2 / (SAMPLES_PER_MS * 1000) > self.limits.max_buffer_s:
            raise RealtimeError(
                f"the input audio buffer holds at most {self.limits.max_buffer_s} s: commit or clear it",
                "audio",
                "input_audio_buffer_full",
            )
        self.buffer += raw
        if self.vad is None:
            return
        for kind, ms in await run_in_threadpool(self.vad.feed, raw):
            if kind == "started":
                await self._speech_started(max(ms, self.buffer_start // SAMPLES_PER_MS))
            elif self.speech_item is not None:
                await self._speech_stopped(ms)

    def _drop_idle_audio(self) -> None:
        """Server VAD between turns: the buffer keeps only the audio a turn starting now may reach back to (its
        prefix padding), trimmed now and then, so a microphone that streams silence (WebRTC, the live demo) never
        fills it."""
        assert self.vad is not None, "server VAD only"
        n, keep = len(self.buffer) // 2, (self.vad.config.prefix_padding_ms + 100) * SAMPLES_PER_MS
        if n > min(10.0, self.limits.max_buffer_s / 2) * 1000 * SAMPLES_PER_MS and n > keep:
            self.buffer_start += n - keep
            del self.buffer[: 2 * (n - keep)]

    async def _speech_started(self, ms: int) -> None:
        self.speech_item, self.speech_start_ms = new_id("item"), ms
        self.emit(server_event("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=self.speech_item))
        td = self.config.turn_detection
        if self.response is not None and td is not None and td.interrupt_response:
            await self.cancel_response("turn_detected")

    async def _speech_stopped(self, ms: int) -> None:
        item_id, self.speech_item = self.speech_item, None
        assert item_id is not None, "speech stopped only after it started"
        self.emit(server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item_id))
        a = self.speech_start_ms * SAMPLES_PER_MS - self.buffer_start
        b = ms * SAMPLES_PER_MS - self.buffer_start
        await self._commit(max(0, a), max(0, min(b, len(self.buffer) // 2)), item_id)
        td = self.config.turn_detection
        if td is not None and td.create_response and self.response is None:
            await self.create_response({})

    async def audio_commit(self, ev: dict) -> None:
        n = len(self.buffer) // 2
        if n < MIN_COMMIT_MS * SAMPLES_PER_MS:
            raise RealtimeError(
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, have {n // SAMPLES_PER_MS} ms",
                None,
                "input_audio_buffer_commit_empty",
            )
        item_id, self.speech_item = self.speech_item or new_id("item"), None
        if self.vad is not None:
            self.vad.reset()
        await self._commit(0, n, item_id)

    async def _commit(self, a: int, b: int, item_id: str) -> None:
        """Samples [a, b) of the buffer become a user item; the buffer keeps what follows b."""
        raw = bytes(self.buffer[2 * a : 2 * b])
        del self.buffer[: 2 * b]
        self.buffer_start += b
        if len(raw) < 2 * MIN_COMMIT_MS * SAMPLES_PER_MS:
            return
        audio = await self._load_audio(raw, "audio")
        item = Item(item_id, "user", [{"type": "input_audio", "transcript": None}], [AudioPart(audio)])
        self.committed_at = time.perf_counter()  # the end of the user's turn: turn latency runs from here
        self.emit(server_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=self._last_id()))
        self._add(item)

    async def audio_clear(self, ev: dict) -> None:
        self.buffer_start += len(self.buffer) // 2
        self.buffer.clear()
        self.speech_item = None
        if self.vad is not None:
            self.vad.reset()
        self.emit(server_event("input_audio_buffer.cleared"))

    async def _load_audio(self, raw: bytes, param: str):
        from omni.encoders import media

        try:
            return await run_in_threadpool(
                media.load_audio, pcm16_to_wav_24k(raw), limits=self.routes.settings.media_limits
            )
        except InvalidRequest as e:
            raise RealtimeError(e.message, param, e.code or "invalid_audio") from None

    # ------------------------------------------------------------------------------------------------ items
    def _last_id(self) -> Optional[str]:
        return self.items[-1].id if self.items else None

    def _add(self, item: Item, previous: Optional[str] = "") -> None:
        """Insert after `previous` ("": at the end; None / "root": first); announce it (added, then done)."""
        if previous == "":
            at = len(self.items)
        elif previous in (None, "root"):
            at = 0
        else:
            at = self._index(previous, "previous_item_id") + 1
        prev = self.items[at - 1].id if at > 0 else None
        self.items.insert(at, item)
        while len(self.items) > self.limits.max_items:
            self.items.pop(0)
        self.emit(server_event("conversation.item.added", previous_item_id=prev, item=item.wire()))
        if item.status != "in_progress":
            self.emit(server_event("conversation.item.done", previous_item_id=prev, item=item.wire()))

    def _index(self, item_id, param: str) -> int:
        for i, it in enumerate(self.items):
            if it.id == item_id:
                return i
        raise RealtimeError(f"no item with id {item_id!r} in the conversation", param, "item_not_found")

    async def item_create(self, ev: dict) -> None:
        spec = ev.get("item")
        if not isinstance(spec, dict) or spec.get("type", "message") != "message":
            raise RealtimeError("item must be a message ({type: \"message\", role, content})", "item", "invalid_value")
        role = spec.get("role")
        if role not in ("user", "system", "assistant"):
            raise RealtimeError(
                f"item.role must be user, system or assistant, got {role!r}", "item.role", "invalid_value"
            )
        content = spec.get("content")
        if not isinstance(content, list) or not content:
            raise RealtimeError("item.content must be a non-empty list", "item.content", "invalid_value")
        item_id = spec.get("id") or new_id("item")
        if any(it.id == item_id for it in self.items):
            raise RealtimeError(f"an item with id {item_id!r} exists already", "item.id", "duplicate_item_id")
        item = Item(item_id, role, [])
        for j, part in enumerate(content):
            await self._add_part(item, part, f"item.content[{j}]")
        self._add(item, ev.get("previous_item_id", ""))

    async def _add_part(self, item: Item, part, param: str) -> None:
        kind = part.get("type") if isinstance(part, dict) else None
        if item.role == "assistant":
            if kind not in ("output_text", "text") or not isinstance(part.get("text"), str):
                raise RealtimeError("assistant items take output_text parts", f"{param}.type", "invalid_value")
            item.content.append({"type": "output_text", "text": part["text"]})
            item.pieces.append((0, part["text"]))
        elif kind in ("input_text", "text"):
            if not isinstance(part.get("text"), str):
                raise RealtimeError(f"{param}.text must be a string", f"{param}.text", "invalid_value")
            item.content.append({"type": "input_text", "text": part["text"]})
            item.parts.append(TextPart(part["text"]))
        elif kind == "input_audio" and item.role == "user":
            raw = decode_pcm16(part.get("audio"), f"{param}.audio")
            item.parts.append(AudioPart(await self._load_audio(raw, f"{param}.audio")))
            item.content.append({"type": "input_audio", "transcript": part.get("transcript")})
        elif kind == "input_image" and item.role == "user":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise RealtimeError(
                    f"{param}.image_url must be a data URI string", f"{param}.image_url", "invalid_value"
                )
            item.parts.append(ImagePart(await self._load_image(url, f"{param}.image_url")))
            item.content.append({"type": "input_image", "image_url": url[:64] + ("..." if len(url) > 64 else "")})
        else:
            raise RealtimeError(
                f"unsupported content part type {kind!r} for a {item.role} item", f"{param}.type", "invalid_value"
            )

    async def _load_image(self, url: str, param: str):
        from omni.encoders import media

        s = self.routes.settings
        try:
            return await run_in_threadpool(media.load_image, url, s.media_policy, s.media_limits)
        except InvalidRequest as e:
            raise RealtimeError(e.message, param, e.code or "invalid_image") from None

    async def item_delete(self, ev: dict) -> None:
        i = self._index(ev.get("item_id"), "item_id")
        if self.response is not None and self.items[i] is self.response.item:
            raise RealtimeError("the item of the response in progress cannot be deleted", "item_id", "invalid_value")
        item = self.items.pop(i)
        self.emit(server_event("conversation.item.deleted", item_id=item.id))

    async def item_truncate(self, ev: dict) -> None:
        item = self.items[self._index(ev.get("item_id"), "item_id")]
        if self.response is not None and item is self.response.item:
            raise RealtimeError("cancel the response before truncating its item", "item_id", "invalid_value")
        if (
            item.role != "assistant"
            or not item.audio_samples
            and not any(p.get("type") == "output_audio" for p in item.content)
        ):
            raise RealtimeError("only an assistant item with audio can be truncated", "item_id", "invalid_value")
        if ev.get("content_index", 0) != 0:
            raise RealtimeError("content_index must be 0", "content_index", "invalid_value")
        ms = ev.get("audio_end_ms")
        have = item.audio_samples // SAMPLES_PER_MS
        if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= have:
            raise RealtimeError(
                f"audio_end_ms must be an integer in 0..{have} (the item's audio)", "audio_end_ms", "invalid_value"
            )
        item.cut_to_audio(ms)
        self.emit(server_event("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=ms))

    async def close(self) -> None:
        try:
            await self.cancel_response(None)
        finally:
            if self._counted:
                self._counted = False
                self.metrics.realtime_sessions.dec()


_HANDLERS = {
    "session.update": Session.session_update,
    "input_audio_buffer.append": Session.audio_append,
    "input_audio_buffer.commit": Session.audio_commit,
    "input_audio_buffer.clear": Session.audio_clear,
    "conversation.item.create": Session.item_create,
    "conversation.item.delete": Session.item_delete,
    "conversation.item.truncate": Session.item_truncate,
    "response.create": Session.response_create,
    "response.cancel": Session.response_cancel,
}
