"""One /v1/realtime session: the conversation (items), the session configuration, the input audio buffer with its
server VAD, and at most one response at a time, run through the same Composition as chat completions (the backend's
`stream`). Client events come in through `handle(event)` one at a time; server events go out through `emit` (a
queue that one writer task drains to the socket, so a cancelled response never cuts an event in half).

A response is cancelled by response.cancel, by speech that starts while it runs (barge-in, when turn_detection's
interrupt_response is on) and by the session's end (the client gone): its task is cancelled, the backend stream is
closed (every stage frees the request's slot, as for a disconnected chat completion), and the assistant item keeps
what was sent: the audio, and of the transcript what the Talker had been given by the last frame sent."""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool

from omni.types import AudioChunk, AudioPart, ChatRequest, Finished, ImagePart, InvalidRequest, TextDelta, TextPart
from omni.serve.api.admission import Admitted
from omni.serve.api.audio_io import pcm16_bytes
from omni.serve.api.common import classify_error
from omni.serve.api.convert import resolve_sampling, resolve_voice
from omni.serve.api.protocol import ChatCompletionRequest
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
    to_messages,
)
from omni.serve.api.realtime_vad import ServerVad, silero_model

__all__ = ["Session"]

log = logging.getLogger("omni.serve.api.realtime")


@dataclass
class _Response:
    id: str
    item: Item
    cfg: SessionConfig
    task: Optional[asyncio.Task] = None
    cancel_reason: Optional[str] = None  # turn_detected, client_cancelled
    finished: Optional[Finished] = None
    error: Optional[Exception] = None
    done: bool = False  # response.done sent
    text_tokens: int = 0
    turn_t0: Optional[float] = None  # perf_counter of the commit that began this turn, until its first audio delta

    @property
    def speak(self) -> bool:
        return "audio" in self.cfg.output_modalities


class Session:
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
        self.response: Optional[_Response] = None
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

    # ------------------------------------------------------------------------------------------------ responses
    async def response_create(self, ev: dict) -> None:
        await self.create_response(ev.get("response") or {})

    async def create_response(self, spec: dict) -> None:
        if self.response is not None:
            raise RealtimeError(
                f"conversation already has an active response in progress: {self.response.id}",
                None,
                "conversation_already_has_active_response",
            )
        cfg = self.check_config(self.config.updated(spec, "response", response=True))
        resp = _Response(new_id("resp"), Item(new_id("item"), "assistant", [], status="in_progress"), cfg)
        chat = self._chat_request(cfg, resp.id)
        try:
            self.backend.validate(chat)
        except InvalidRequest as e:
            raise RealtimeError(e.message, e.param, e.code or "invalid_value") from None
        self.response, self.responses = resp, self.responses + 1
        resp.turn_t0, self.committed_at = self.committed_at, None
        self.emit(server_event("response.created", response=self._response_wire(resp, "in_progress")))
        part = {"type": "audio", "transcript": ""} if resp.speak else {"type": "text", "text": ""}
        resp.item.content.append(
            {"type": "output_audio", "transcript": ""} if resp.speak else {"type": "output_text", "text": ""}
        )
        self.emit(
            server_event("response.output_item.added", response_id=resp.id, output_index=0, item=resp.item.wire())
        )
        self._add(resp.item)
        self.emit(
            server_event(
                "response.content_part.added",
                response_id=resp.id,
                item_id=resp.item.id,
                output_index=0,
                content_index=0,
                part=part,
            )
        )
        resp.task = asyncio.ensure_future(self._run(resp, chat))

    def _chat_request(self, cfg: SessionConfig, request_id: str) -> ChatRequest:
        s = dict(cfg.sampling)
        body = {
            "messages": [{"role": "user", "content": "-"}],
            "temperature": s.get("temperature"),
            "top_p": s.get("top_p"),
            "top_k": s.get("top_k"),
            "seed": s.get("seed"),
            "max_tokens": cfg.max_output_tokens,
        }
        if s.get("max_output_audio_tokens") is not None:
            body["sampling_params_list"] = [{}, {"max_tokens": s["max_output_audio_tokens"]}]
        try:
            thinker, talker, vocoder_seed = resolve_sampling(
                ChatCompletionRequest.model_validate(body), self.routes.convert_options
            )
        except InvalidRequest as e:
            raise RealtimeError(e.message, e.param, e.code or "invalid_value") from None
        messages = to_messages(self.items, cfg.instructions)
        if not messages:
            raise RealtimeError(
                "the conversation is empty: add an item or commit audio first", None, "conversation_empty"
            )
        return ChatRequest(
            messages=messages,
            sampling=thinker,
            talker_sampling=talker,
            speak="audio" in cfg.output_modalities,
            voice=cfg.voice,
            vocoder_seed=vocoder_seed,
            request_id=request_id,
        )

    async def _run(self, resp: _Response, chat: ChatRequest) -> None:
        routes, admitted, ok = self.routes, None, False
        try:
            if not routes.admission.try_acquire():
                raise RealtimeError(
                    f"server is at its limit of {routes.admission.limit} concurrent requests",
                    None,
                    "overloaded",
                    "server_error",
                )
            admitted = Admitted(routes.admission, routes.metrics.track(resp.speak))
            admitted.request_id = resp.id
            if resp.speak:
                if not await routes.speech_gate.acquire():
                    raise RealtimeError(
                        "all speech streams of this server are busy", None, "overloaded", "server_error"
                    )
                admitted.on_release = routes.speech_gate.release
            admitted.events = self.backend.stream(chat)
            async for ev in admitted.events:
                admitted.track.on_event(ev)
                self._on_event(resp, ev)
            ok = True
        except asyncio.CancelledError:
            if resp.cancel_reason is None:  # the session is closing: nobody to tell
                raise
        except Exception as e:  # noqa: BLE001 - reported in response.done
            resp.error = e
        finally:
            if admitted is not None:
                await admitted.release(ok)
        self._finish(resp)

    def _on_event(self, resp: _Response, ev) -> None:
        ids = {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0, "content_index": 0}
        if isinstance(ev, TextDelta):
            resp.text_tokens += len(ev.token_ids)
            resp.item.pieces.append((resp.text_tokens, ev.text))
            if ev.text:
                kind = "response.output_audio_transcript.delta" if resp.speak else "response.output_text.delta"
                self.emit(server_event(kind, delta=ev.text, **ids))
        elif isinstance(ev, AudioChunk):
            raw = pcm16_bytes(ev.pcm)
            if raw:
                if resp.turn_t0 is not None:
                    self.metrics.realtime_turn_latency.observe(time.perf_counter() - resp.turn_t0)
                    resp.turn_t0 = None
                resp.item.audio_samples += len(raw) // 2
                self.emit(
                    server_event("response.output_audio.delta", delta=base64.b64encode(raw).decode("ascii"), **ids)
                )
        elif isinstance(ev, Finished):
            resp.finished = ev

    def _finish(self, resp: _Response) -> None:
        """The done events of a response however it ended; frees the session for the next one."""
        if resp.done:
            return
        resp.done = True
        if self.response is resp:
            self.response = None
        item, ids = resp.item, {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0}
        if resp.cancel_reason is not None:
            status = "cancelled"
        elif resp.error is not None or resp.finished is None:
            status = "failed"
        else:
            status = "incomplete" if resp.finished.finish_reason == "length" else "completed"
        if resp.speak:
            text = item.cut_to_audio(item.audio_samples // SAMPLES_PER_MS) if status == "cancelled" else item.text
            item.content = [{"type": "output_audio", "transcript": text}]
            self.emit(server_event("response.output_audio.done", content_index=0, **ids))
            self.emit(server_event("response.output_audio_transcript.done", content_index=0, transcript=text, **ids))
            part = {"type": "audio", "transcript": text}
        else:
            text = item.text
            item.content = [{"type": "output_text", "text": text}]
            self.emit(server_event("response.output_text.done", content_index=0, text=text, **ids))
            part = {"type": "text", "text": text}
        item.status = "completed" if status == "completed" else "incomplete"
        self.emit(server_event("response.content_part.done", content_index=0, part=part, **ids))
        self.emit(server_event("response.output_item.done", response_id=resp.id, output_index=0, item=item.wire()))
        if any(it is item for it in self.items):
            i = next(i for i, it in enumerate(self.items) if it is item)
            prev = self.items[i - 1].id if i > 0 else None
            self.emit(server_event("conversation.item.done", previous_item_id=prev, item=item.wire()))
        self.emit(server_event("response.done", response=self._response_wire(resp, status)))

    def _response_wire(self, resp: _Response, status: str) -> dict:
        out: dict[str, Any] = {
            "id": resp.id,
            "object": "realtime.response",
            "status": status,
            "output_modalities": list(resp.cfg.output_modalities),
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": resp.cfg.voice}},
            "max_output_tokens": resp.cfg.max_output_tokens or "inf",
            "conversation_id": self.id,
            "output": [] if status == "in_progress" else [resp.item.wire()],
            "status_details": None,
            "usage": None,
        }
        if status == "cancelled":
            out["status_details"] = {"type": "cancelled", "reason": resp.cancel_reason}
        elif status == "failed":
            err = classify_error(resp.error or RuntimeError("no Finished event"), resp.id)
            out["status_details"] = {
                "type": "failed",
                "error": {
                    "type": "server_error" if err.status >= 500 else "invalid_request_error",
                    "code": err.code,
                    "message": err.message,
                },
            }
        elif status == "incomplete":
            out["status_details"] = {"type": "incomplete", "reason": "max_output_tokens"}
        fin = resp.finished
        if fin is not None:
            out["usage"] = {
                "total_tokens": fin.prompt_tokens + fin.completion_tokens + fin.codec_tokens,
                "input_tokens": fin.prompt_tokens,
                "output_tokens": fin.completion_tokens + fin.codec_tokens,
                "output_token_details": {"text_tokens": fin.completion_tokens, "audio_tokens": fin.codec_tokens},
            }
        return out

    async def response_cancel(self, ev: dict) -> None:
        if self.response is None:
            raise RealtimeError("there is no response in progress to cancel", None, "response_cancel_not_active")
        await self.cancel_response("client_cancelled")

    async def cancel_response(self, reason: Optional[str]) -> None:
        """Cancel the running response in every stage; wait until its slots are freed and (with a reason) its
        done events are out. reason None: the session is closing, nothing is sent."""
        resp = self.response
        if resp is None or resp.task is None:
            return
        resp.cancel_reason = reason
        if reason == "turn_detected":
            self.metrics.realtime_barge_ins.inc()
        resp.task.cancel()
        try:
            await resp.task
        except asyncio.CancelledError:
            # the caller's own cancellation goes on; Task.cancelling() is Python 3.11+ (on 3.10, the pre-3.11 idiom:
            # the CancelledError is taken as the response task's)
            if sys.version_info >= (3, 11):
                current = asyncio.current_task()
                assert current is not None, "a coroutine runs in a task"
                if current.cancelling():
                    raise
        except Exception:  # noqa: BLE001 - already reported
            log.exception("response %s failed while cancelled", resp.id)
        if reason is not None:
            self._finish(resp)
        elif self.response is resp:
            self.response = None

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
