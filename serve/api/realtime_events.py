"""The Realtime API's wire shapes (OpenAI's GA event names): the limits of a session, the session's configuration
(what `session.update` may set and what `session.created/updated` show), the conversation's items, and the server
events built from them. No I/O here: serve/api/realtime.py runs the sessions.

Audio on the wire is base64 PCM16 mono at 24 kHz (`{"type": "audio/pcm", "rate": 24000}`) both ways; the audio tower
gets it resampled to 16 kHz by the media loader (librosa, as every other audio input)."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

from omni.types import AUDIO_SAMPLE_RATE, DEFAULT_VOICE, Message, TextPart

__all__ = [
    "RealtimeLimits",
    "RealtimeError",
    "TurnDetection",
    "SessionConfig",
    "Item",
    "new_id",
    "server_event",
    "error_event",
    "decode_pcm16",
    "PCM_FORMAT",
    "SAMPLES_PER_MS",
    "MIN_COMMIT_MS",
    "to_messages",
    "pcm16_to_wav_24k",
]

PCM_FORMAT = {"type": "audio/pcm", "rate": AUDIO_SAMPLE_RATE}  # the one audio format, in and out
SAMPLES_PER_MS = AUDIO_SAMPLE_RATE // 1000  # 24 samples of 24 kHz audio per millisecond
MIN_COMMIT_MS = 100  # a commit of less audio is refused (OpenAI's limit)


@dataclass(frozen=True)
class RealtimeLimits:
    """Bounds of one `/v1/realtime` session (ServeConfig.realtime; README: Realtime)."""

    max_session_s: float = 1800.0  # a session is closed this long after it opened (OpenAI: 30 minutes)
    max_buffer_s: float = 60.0  # input audio held uncommitted at most; an append past it is refused
    max_events_per_s: float = 200.0  # client events per second (a bucket of that size, refilled each second)
    max_message_bytes: int = 8 * 2**20  # one client event's JSON at most
    max_items: int = 1000  # conversation items kept; the oldest are dropped past it
    client_secret_ttl_s: int = 600  # default lifetime of a client secret (expires_after.seconds: 10..7200)

    def __post_init__(self):
        for name in ("max_session_s", "max_buffer_s", "max_events_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"realtime.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_message_bytes", "max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"realtime.{name} must be >= 1, got {getattr(self, name)}")
        if not 10 <= self.client_secret_ttl_s <= 7200:
            raise ValueError(f"realtime.client_secret_ttl_s must be in 10..7200, got {self.client_secret_ttl_s}")


class RealtimeError(Exception):
    """A client event that cannot be done: sent back as an `error` event; the session goes on."""

    def __init__(
        self, message: str, param: Optional[str] = None, code: Optional[str] = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.kind = message, param, code, kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def server_event(kind: str, **fields) -> dict:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(err: RealtimeError, client_event_id: Optional[str] = None) -> dict:
    """OpenAI's error event: {type: "error", event_id, error: {type, code, message, param, event_id}}."""
    return server_event(
        "error",
        error={
            "type": err.kind,
            "code": err.code,
            "message": err.message,
            "param": err.param,
            "event_id": client_event_id,
        },
    )


def decode_pcm16(data: Any, param: str) -> bytes:
    """base64 PCM16 LE mono -> its bytes; RealtimeError for bad base64 or an odd byte count."""
    if not isinstance(data, str):
        raise RealtimeError(f"{param} must be a base64 string", param, "invalid_value")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RealtimeError(f"{param} is not valid base64: {e}", param, "invalid_base64") from None
    if len(raw) % 2:
        raise RealtimeError(
            f"{param}: {len(raw)} bytes is not whole 16-bit samples (audio/pcm is PCM16 mono at "
            f"{AUDIO_SAMPLE_RATE} Hz)",
            param,
            "invalid_audio_format",
        )
    return raw


# ---------------------------------------------------------------------------------------------------- session
@dataclass(frozen=True)
class TurnDetection:
    """Server VAD (`turn_detection: {type: "server_vad", ...}`); None in the config: manual commits."""

    threshold: float = 0.5  # speech probability (Silero VAD) that starts speech
    prefix_padding_ms: int = 300  # audio before the detected start that is committed with the turn
    silence_duration_ms: int = 500  # silence that ends the turn
    create_response: bool = True  # a response is created when the turn ends
    interrupt_response: bool = True  # speech while a response runs cancels it (barge-in)

    def wire(self) -> dict:
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }


_SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "seed": int, "max_output_audio_tokens": int}


@dataclass(frozen=True)
class SessionConfig:
    """What session.update sets; response.create may override instructions, voice, modalities and max tokens for one
    response. Sampling (omni's extension of the session object): temperature, top_p, top_k, seed for the Thinker,
    max_output_audio_tokens for the Talker (codec tokens, 50 per second of speech)."""

    instructions: Optional[str] = None  # the system message (None: the model's default system prompt)
    output_modalities: tuple[str, ...] = ("audio",)  # ("audio",): speech and its transcript; ("text",): text only
    voice: str = DEFAULT_VOICE
    turn_detection: Optional[TurnDetection] = TurnDetection()
    max_output_tokens: Optional[int] = None  # None: "inf" (the server's default max_tokens)
    sampling: tuple[tuple[str, Any], ...] = ()  # (name, value) of _SAMPLING set by the client

    def wire(self, session_id: str, model: str, expires_at: int) -> dict:
        td = self.turn_detection.wire() if self.turn_detection else None
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": list(self.output_modalities),
            "instructions": self.instructions or "",
            "audio": {
                "input": {"format": PCM_FORMAT, "turn_detection": td},
                "output": {"format": PCM_FORMAT, "voice": self.voice},
            },
            "max_output_tokens": self.max_output_tokens if self.max_output_tokens is not None else "inf",
            "expires_at": expires_at,
            **dict(self.sampling),
        }

    def updated(self, patch: Any, param: str = "session", response: bool = False) -> SessionConfig:
        """This config with the fields of a session.update's `session` (or a response.create's `response`) applied;
        fields this server does not use (tools, tracing, ...) are ignored; bad values raise RealtimeError."""
        if not isinstance(patch, dict):
            raise RealtimeError(f"{param} must be an object", param, "invalid_value")
        cfg = self
        if "instructions" in patch:
            v = patch["instructions"]
            if v is not None and not isinstance(v, str):
                raise RealtimeError(f"{param}.instructions must be a string", f"{param}.instructions", "invalid_value")
            cfg = replace(cfg, instructions=v or None)
        if "output_modalities" in patch:
            m = patch["output_modalities"]
            if m not in (["audio"], ["text"], ("audio",), ("text",)):
                raise RealtimeError(
                    f'{param}.output_modalities must be ["audio"] or ["text"], got {m!r}',
                    f"{param}.output_modalities",
                    "invalid_value",
                )
            cfg = replace(cfg, output_modalities=tuple(m))
        if "max_output_tokens" in patch:
            cfg = replace(cfg, max_output_tokens=_max_tokens(patch["max_output_tokens"], f"{param}.max_output_tokens"))
        audio = patch.get("audio")
        if audio is not None:
            if not isinstance(audio, dict):
                raise RealtimeError(f"{param}.audio must be an object", f"{param}.audio", "invalid_value")
            cfg = cfg._audio(audio, f"{param}.audio", response)
        if "voice" in patch:  # the beta shape, still sent by some clients
            cfg = replace(cfg, voice=_str(patch["voice"], f"{param}.voice"))
        sampling = dict(cfg.sampling)
        for name, kind in _SAMPLING.items():
            if name in patch:
                sampling[name] = _number(patch[name], kind, f"{param}.{name}")
        return replace(cfg, sampling=tuple(sorted((k, v) for k, v in sampling.items() if v is not None)))

    def _audio(self, audio: dict, param: str, response: bool) -> SessionConfig:
        cfg = self
        out = audio.get("output") or {}
        if "voice" in out:
            cfg = replace(cfg, voice=_str(out["voice"], f"{param}.output.voice"))
        _check_format(out.get("format"), f"{param}.output.format")
        inp = audio.get("input") or {}
        if response and inp:
            raise RealtimeError(f"{param}.input is not a response setting", f"{param}.input", "unknown_parameter")
        _check_format(inp.get("format"), f"{param}.input.format")
        if "turn_detection" in inp:
            cfg = replace(cfg, turn_detection=_turn_detection(inp["turn_detection"], f"{param}.input.turn_detection"))
        return cfg


def _str(v, param: str) -> str:
    if not isinstance(v, str) or not v:
        raise RealtimeError(f"{param} must be a non-empty string", param, "invalid_value")
    return v


def _number(v, kind, param: str):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RealtimeError(f"{param} must be {'an integer' if kind is int else 'a number'}", param, "invalid_value")
    return kind(v)


def _max_tokens(v, param: str) -> Optional[int]:
    if v is None or v == "inf":
        return None
    n = _number(v, int, param)
    if n < 1:
        raise RealtimeError(f"{param} must be >= 1 or \"inf\"", param, "invalid_value")
    return n


def _check_format(fmt, param: str) -> None:
    if fmt is None:
        return
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "audio/pcm"
        or fmt.get("rate", AUDIO_SAMPLE_RATE) != AUDIO_SAMPLE_RATE
    ):
        raise RealtimeError(f"{param}: only {PCM_FORMAT} is supported, got {fmt!r}", param, "unsupported_audio_format")


def _turn_detection(td, param: str) -> Optional[TurnDetection]:
    if td is None:
        return None
    if not isinstance(td, dict) or td.get("type") != "server_vad":
        raise RealtimeError(
            f'{param}: only {{"type": "server_vad", ...}} or null is supported', param, "unsupported_turn_detection"
        )
    base, kw = TurnDetection(), {}
    for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
        if td.get(name) is not None:
            kind = float if name == "threshold" else int
            kw[name] = _number(td[name], kind, f"{param}.{name}")
    for name in ("create_response", "interrupt_response"):
        if td.get(name) is not None:
            if not isinstance(td[name], bool):
                raise RealtimeError(f"{param}.{name} must be a boolean", f"{param}.{name}", "invalid_value")
            kw[name] = td[name]
    out = replace(base, **kw)
    if not 0.0 < out.threshold < 1.0:
        raise RealtimeError(f"{param}.threshold must be in (0, 1)", f"{param}.threshold", "invalid_value")
    if not (0 <= out.prefix_padding_ms <= 10_000 and 0 < out.silence_duration_ms <= 10_000):
        raise RealtimeError(
            f"{param}: prefix_padding_ms must be in 0..10000 and silence_duration_ms in 1..10000",
            param,
            "invalid_value",
        )
    return out


# ---------------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One conversation item: its wire content (for events) and what the prompt gets (`parts` for user and system
    messages; for assistant messages the heard text). An assistant item keeps its streamed text piece by piece with
    the token count so far, and the audio sent, to be cut to what the user heard."""

    id: str
    role: Literal["system", "user", "assistant"]
    content: list[dict]  # the wire content parts (audio bytes left out)
    parts: list = field(default_factory=list)  # user/system: omni parts (TextPart, AudioPart, ImagePart)
    status: str = "completed"
    pieces: list[tuple[int, str]] = field(default_factory=list)  # assistant: (tokens so far, text) per delta
    audio_samples: int = 0  # assistant: 24 kHz samples sent
    heard_text: Optional[str] = None  # assistant: the text the next turn sees (None: all of it)

    def wire(self) -> dict:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "status": self.status,
            "role": self.role,
            "content": self.content,
        }

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.pieces)

    def cut_to_audio(self, audio_ms: int) -> str:
        """Keep the audio up to `audio_ms` and the text the Talker had been given by then: it reads the reply one
        text token per codec step (50 per second), so by frame k it can have spoken no more than the first k tokens.
        -> the kept transcript."""
        self.audio_samples = min(self.audio_samples, audio_ms * SAMPLES_PER_MS)
        frames = self.audio_samples // (AUDIO_SAMPLE_RATE // 50)
        kept = "".join(t for n, t in self.pieces if n <= frames)
        self.heard_text = kept
        for part in self.content:
            if part.get("type") == "output_audio":
                part["transcript"] = kept
        return kept


def to_messages(items: list[Item], instructions: Optional[str]) -> list[Message]:
    """The conversation as the prompt's messages: instructions as the system message, user and system items with
    their parts (one text part as a plain string, as a chat completion sends it), assistant items as the text heard."""
    out = [Message("system", instructions)] if instructions else []
    for it in items:
        if it.role == "assistant":
            out.append(Message("assistant", it.heard_text if it.heard_text is not None else it.text))
        elif len(it.parts) == 1 and isinstance(it.parts[0], TextPart):
            out.append(Message(it.role, it.parts[0].text))
        else:
            out.append(Message(it.role, list(it.parts)))
    return out


def pcm16_to_wav_24k(raw: bytes) -> bytes:
    """PCM16 mono 24 kHz bytes -> a WAV file (what the media loader reads and resamples)."""
    from omni.serve.api.audio_io import wav_header

    return wav_header(len(raw), AUDIO_SAMPLE_RATE) + raw
