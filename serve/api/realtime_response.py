"""The responses of a /v1/realtime session (serve/api/realtime_session.py): at most one at a time, run through the
same Composition as chat completions (the backend's `stream`), its events sent as the stages produce them, its done
events however it ended (completed, incomplete at max_output_tokens, failed, cancelled).

A response is cancelled by response.cancel, by speech that starts while it runs (barge-in, when turn_detection's
interrupt_response is on) and by the session's end (the client gone): its task is cancelled, the backend stream is
closed (every stage frees the request's slot, as for a disconnected chat completion), and the assistant item keeps
what was sent: the audio, and of the transcript what the Talker had been given by the last frame sent. /metrics:
the turn latency (from the commit that began the turn to the first audio delta) and the barge-ins."""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from omni.types import AudioChunk, ChatRequest, Finished, InvalidRequest, TextDelta
from omni.serve.api.admission import Admitted
from omni.serve.api.audio_io import pcm16_bytes
from omni.serve.api.common import classify_error
from omni.serve.api.convert import resolve_sampling
from omni.serve.api.protocol import ChatCompletionRequest
from omni.serve.api.realtime_events import (
    SAMPLES_PER_MS,
    Item,
    RealtimeError,
    SessionConfig,
    new_id,
    server_event,
    to_messages,
)

__all__ = ["Response", "Responses"]

log = logging.getLogger("omni.serve.api.realtime")


@dataclass
class Response:
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


class Responses:
    """The response half of a Session (a base class: the session holds the state below and `_add`s items)."""

    routes: Any  # the app's _Routes
    backend: Any
    metrics: Any  # serve/api/metrics.py's Metrics
    emit: Callable[[dict], None]
    id: str
    config: SessionConfig
    items: list[Item]
    response: Optional[Response]
    responses: int  # created in this session
    committed_at: Optional[float]  # perf_counter of the last commit no response has answered yet

    def check_config(self, cfg: SessionConfig) -> SessionConfig:
        raise NotImplementedError

    def _add(self, item: Item, previous: Optional[str] = "") -> None:
        raise NotImplementedError

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
        resp = Response(new_id("resp"), Item(new_id("item"), "assistant", [], status="in_progress"), cfg)
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

    async def _run(self, resp: Response, chat: ChatRequest) -> None:
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

    def _on_event(self, resp: Response, ev) -> None:
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

    def _finish(self, resp: Response) -> None:
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

    def _response_wire(self, resp: Response, status: str) -> dict:
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
