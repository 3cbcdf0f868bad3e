"""OpenAI chat completions <-> omni: a `ChatCompletionRequest` becomes an `omni.types.ChatRequest` (media decoded
through omni.encoders.media, sampling resolved per stage), and the backend's events become either one
`ChatCompletionResponse` or a stream of `ChatCompletionChunk`s. Both paths consume the same event stream through
one per-request `Completion` object.

Sampling: the top-level fields are the Thinker's; vllm-omni's `sampling_params_list` = [thinker, talker, vocoder]
overrides them field by field (fields left out keep the value below them). The Talker starts from
TALKER_DEFAULT_SAMPLING and takes the request's `seed` unless `sampling_params_list[1].seed` is given, so one seed
makes the whole reply (text and speech) reproducible; the vocoder's seed is `sampling_params_list[2].seed`, else
the Talker's.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from omni.types import (
    AUDIO_SAMPLE_RATE,
    DEFAULT_VOICE,
    TALKER_DEFAULT_SAMPLING,
    AudioChunk,
    AudioPart,
    ChatRequest,
    Event,
    Finished,
    ImagePart,
    InvalidRequest,
    Message,
    SamplingParams,
    TextDelta,
    TextPart,
    VideoPart,
)
from omni.encoders.sources import MediaLimits, MediaPolicy
from omni.serve.api.audio_io import ACCEPTED_FORMATS, AudioStreamEncoder, canonical_format, encode_audio, pcm16_bytes
from omni.serve.api.media_cache import MediaCache, is_inline
from omni.serve.api.protocol import (
    AssistantMessage,
    AudioURLContent,
    ChatCompletionAudio,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    Delta,
    DeltaAudio,
    ErrorInfo,
    ErrorResponse,
    ImageContent,
    InputAudioContent,
    SpeechRequest,
    StageSamplingParams,
    StreamChoice,
    TextContent,
    Usage,
    VideoURLContent,
)

__all__ = [
    "ConvertOptions",
    "to_chat_request",
    "to_speech_request",
    "resolve_sampling",
    "resolve_voice",
    "Completion",
    "error_response",
    "sse",
    "SSE_DONE",
    "SPEECH_PROMPT",
]

SSE_DONE = "data: [DONE]\n\n"
AUDIO_EXPIRY_S = 3600  # message.audio.expires_at = created + this (OpenAI's field; nothing is kept server-side)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty")


@dataclass(frozen=True)
class ConvertOptions:
    max_tokens_limit: int = 4096  # a request asking for more generated tokens gets a 400
    default_max_tokens: int = 256  # when the request gives neither max_tokens nor max_completion_tokens
    default_sampling: SamplingParams = SamplingParams()  # the Thinker's when the request says nothing (the
    #                                                     checkpoint's generation config; max_tokens is replaced)
    default_speech_tokens: int = 2048  # the Talker's max codec tokens (50 per second) unless sampling_params_list[1]
    media_limits: MediaLimits = MediaLimits()  # per media item: bytes, pixels, seconds, frames
    media_policy: MediaPolicy = MediaPolicy()  # where media may come from (data: always; local paths, http(s))
    voices: tuple[str, ...] = ()  # the backend's voices, to accept "chelsie" for "Chelsie"; empty: as sent
    media_cache: Optional[MediaCache] = None  # decoded inline media by content hash (serve/api/media_cache.py)


# ---------------------------------------------------------------------------------------------------- request
def _override(base: SamplingParams, over: Optional[StageSamplingParams]) -> SamplingParams:
    if over is None:
        return base
    changes = {f: getattr(over, f) for f in _SAMPLING_FIELDS if getattr(over, f) is not None}
    if over.stop_token_ids is not None:
        changes["stop_token_ids"] = tuple(over.stop_token_ids)
    return replace(base, **changes)


def resolve_sampling(
    req: ChatCompletionRequest, opts: ConvertOptions
) -> tuple[SamplingParams, SamplingParams, Optional[int]]:
    """-> (thinker, talker, vocoder seed); max_tokens past the server's limit raises InvalidRequest. The values are
    range-checked by the wire's types (protocol.py) and by the composition's one check (omni.serve.compose)."""
    stages = list(req.sampling_params_list or []) + [None, None, None]
    top = StageSamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        stop_token_ids=req.stop_token_ids,
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
    )
    default = replace(opts.default_sampling, max_tokens=min(opts.default_max_tokens, opts.max_tokens_limit))
    thinker = _override(_override(default, top), stages[0])
    talker = _override(
        replace(TALKER_DEFAULT_SAMPLING, seed=thinker.seed, max_tokens=opts.default_speech_tokens), stages[1]
    )
    vocoder_seed = stages[2].seed if stages[2] is not None else None
    if thinker.max_tokens > opts.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens={thinker.max_tokens} is more than this server allows ({opts.max_tokens_limit})",
            "max_tokens",
            "max_tokens_too_large",
        )
    return thinker, talker, vocoder_seed


def _b64decode(data: str, param: str) -> bytes:
    if data.startswith("data:"):  # some clients send a data URI where plain base64 is expected
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{param} is not valid base64: {e}", param, "invalid_base64") from None
    if not raw:
        raise InvalidRequest(f"{param} is empty", param, "invalid_base64")
    return raw


def _convert_part(part, param: str, use_audio_in_video: bool, opts: ConvertOptions):
    if isinstance(part, TextContent):
        return TextPart(part.text)
    from omni.encoders import media

    kw = {"limits": opts.media_limits, "policy": opts.media_policy}
    cache = opts.media_cache

    def load(kind: str, source, params, decode):
        """`decode()`, or the cached item of an inline `source` (a data: URI, or base64 already decoded to bytes)."""
        inline = isinstance(source, bytes) or is_inline(source)
        return cache.get(kind, source, params, decode) if cache is not None and inline else decode()

    if isinstance(part, ImageContent):
        url = part.image_url.url
        return ImagePart(load("image", url, None, lambda: media.load_image(url, **kw)))
    if isinstance(part, AudioURLContent):
        url = part.audio_url.url
        return AudioPart(load("audio", url, None, lambda: media.load_audio(url, **kw)))
    if isinstance(part, InputAudioContent):
        raw = _b64decode(part.input_audio.data, f"{param}.input_audio.data")
        return AudioPart(load("audio", raw, None, lambda: media.load_audio(raw, **kw)))
    if isinstance(part, VideoURLContent):
        url, n = part.video_url.url, part.video_url.num_frames
        return VideoPart(
            load(
                "video",
                url,
                (n, use_audio_in_video),
                lambda: media.load_video(url, fps=None, num_frames=n, with_audio=use_audio_in_video, **kw),
            )
        )
    raise InvalidRequest(f"unsupported content part {type(part).__name__} at {param}", param)


SAMPLING_NAMES = ("sampling", "sampling_params_list[1]")  # the Thinker's and the Talker's sampling, as the wire says


def resolve_voice(voice: Optional[str], voices: Sequence[str]) -> str:
    """The model's spelling of a voice ("chelsie" -> "Chelsie"); unknown voices go on: the backend rejects them,
    listing the valid ones."""
    voice = voice or DEFAULT_VOICE
    by_lower = {v.lower(): v for v in voices}
    return by_lower.get(voice.lower(), voice)


def _voice(req: ChatCompletionRequest, voices: Sequence[str]) -> str:
    return resolve_voice((req.audio.voice if req.audio else None) or req.speaker, voices)


SPEECH_PROMPT = "Read the following text aloud, exactly as written."  # the user turn of a speech request


def to_speech_request(req: SpeechRequest, request_id: str, opts: ConvertOptions = ConvertOptions()) -> ChatRequest:
    """/v1/audio/speech -> a chat whose reply is forced to `input`: the user turn asks for it to be read (with the
    `instructions` when given), the Thinker reads the reply in one prefill, the Talker and the vocoder speak it."""
    if req.speed != 1.0:
        raise InvalidRequest(
            f"speed={req.speed} is not supported: the model speaks at its own pace (1.0)", "speed", "unsupported_speed"
        )
    stages = list(req.sampling_params_list or []) + [None, None, None]
    talker = _override(
        replace(TALKER_DEFAULT_SAMPLING, seed=req.seed, max_tokens=opts.default_speech_tokens), stages[1]
    )
    ask = (
        f"{req.instructions.strip()}\n{SPEECH_PROMPT}"
        if req.instructions and req.instructions.strip()
        else SPEECH_PROMPT
    )
    return ChatRequest(
        messages=[Message("user", f"{ask}\n\n{req.input}")],
        sampling=SamplingParams(max_tokens=1),
        talker_sampling=talker,
        speak=True,
        voice=resolve_voice(req.voice, opts.voices),
        vocoder_seed=stages[2].seed if stages[2] is not None else None,
        request_id=request_id,
        forced_reply=req.input,
        sampling_names=SAMPLING_NAMES,
    )


def to_chat_request(
    req: ChatCompletionRequest, request_id: str, opts: ConvertOptions = ConvertOptions()
) -> ChatRequest:
    """Decode the media and resolve sampling. Blocking (decoding, fetching): call it off the event loop.
    Raises InvalidRequest (or MediaError, a subclass with .status_code 400/413)."""
    if req.speak and req.audio is not None and req.audio.format not in ACCEPTED_FORMATS:
        raise InvalidRequest(
            f"unsupported audio format {req.audio.format!r}; supported: {', '.join(ACCEPTED_FORMATS)}",
            "audio.format",
            "unsupported_audio_format",
        )
    thinker, talker, vocoder_seed = resolve_sampling(req, opts)
    messages = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            messages.append(Message(role, msg.content or ""))
            continue
        parts = []
        for j, part in enumerate(msg.content):
            param = f"messages[{i}].content[{j}]"
            try:
                parts.append(_convert_part(part, param, req.use_audio_in_video, opts))
            except InvalidRequest as e:  # MediaError included: say which part it was
                if e.param is None or not e.param.startswith("messages"):
                    e.param = f"{param}.{e.param}" if e.param else param
                    e.message = f"{e.param}: {e.message}"
                    e.args = (e.message,)
                raise
        messages.append(Message(role, parts))
    return ChatRequest(
        messages=messages,
        sampling=thinker,
        talker_sampling=talker,
        speak=req.speak,
        voice=_voice(req, opts.voices),
        use_audio_in_video=req.use_audio_in_video,
        vocoder_seed=vocoder_seed,
        request_id=request_id,
        sampling_names=SAMPLING_NAMES,
    )


# ---------------------------------------------------------------------------------------------------- response
class _StopStrings:
    """Cuts the text at the first stop string; text that may be the start of one is held until it is decided."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held = tuple(stops), ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to send, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = max(
            (k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0
        )
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Completion:
    """One request's reply as it is built from the backend's events; `feed` returns the chunks an event makes
    (streaming), `response()` the whole reply (non-streaming). `done` turns true at Finished or a stop string."""

    def __init__(
        self,
        request_id: str,
        model: str,
        speak: bool = False,
        audio_format: str = "wav",
        include_usage: bool = False,
        stop: Sequence[str] = (),
        dialect: str = "openai",
    ):
        self.request_id = request_id
        self.id, self.model, self.created = f"chatcmpl-{request_id}", model, int(time.time())
        self.audio_id = f"audio_{request_id}"
        self.speak, self.include_usage = speak, include_usage
        # vllm-omni's dialect: chunks carry `modality`, audio is a base64 WAV per chunk in delta.content, and a
        # whole reply has its text and its audio as two choices
        self.vllm = dialect == "vllm-omni"
        self.audio_format = "wav" if self.vllm else canonical_format(audio_format)
        # streamed deltas: PCM16 for wav and pcm (OpenAI's streaming shape), else the format's own bytes
        self._encoder = AudioStreamEncoder(self.audio_format) if self.audio_format not in ("wav", "pcm") else None
        self.text: list[str] = []
        self.pcm: list[np.ndarray] = []  # each [n] float32 at 24 kHz
        self.finish_reason: Optional[str] = None
        self.prompt_tokens = 0
        self.completion_tokens = 0  # counted from the deltas until Finished gives the total
        self._stop = _StopStrings(stop)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _chunk(
        self, delta: Delta, finish_reason: Optional[str] = None, modality: Optional[str] = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[StreamChoice(delta=delta, finish_reason=finish_reason)],
            modality=(modality or "text") if self.vllm else None,
        )

    def role_chunk(self) -> ChatCompletionChunk:
        return self._chunk(Delta(role="assistant", content=""))

    def _text_chunk(self, text: str) -> list[ChatCompletionChunk]:
        if not text:
            return []
        self.text.append(text)
        return [self._chunk(Delta(content=text))]

    def _audio_chunk(self, raw: bytes) -> list[ChatCompletionChunk]:
        if not raw:
            return []
        data = base64.b64encode(raw).decode("ascii")
        return [self._chunk(Delta(audio=DeltaAudio(id=self.audio_id, data=data, transcript="")))]

    def feed(self, ev: Event) -> list[ChatCompletionChunk]:
        if self.done:
            return []
        if isinstance(ev, TextDelta):
            self.completion_tokens += len(ev.token_ids)
            text, hit = self._stop.push(ev.text)
            chunks = self._text_chunk(text)
            if hit:
                self.finish_reason = "stop"
            return chunks
        if isinstance(ev, AudioChunk):
            if ev.sample_rate != AUDIO_SAMPLE_RATE:
                raise RuntimeError(f"backend sent audio at {ev.sample_rate} Hz, expected {AUDIO_SAMPLE_RATE}")
            if len(ev.pcm) == 0:
                return []
            self.pcm.append(np.asarray(ev.pcm, dtype=np.float32).reshape(-1))
            if self.vllm:  # each chunk a whole WAV file, base64 in delta.content
                wav = base64.b64encode(encode_audio(ev.pcm, "wav")).decode("ascii")
                return [self._chunk(Delta(content=wav), modality="audio")]
            raw = self._encoder.feed(ev.pcm) if self._encoder is not None else pcm16_bytes(ev.pcm)
            return self._audio_chunk(raw)
        if isinstance(ev, Finished):
            chunks = self._text_chunk(self._stop.flush())
            if self._encoder is not None:
                chunks += self._audio_chunk(self._encoder.close())
            self.finish_reason = ev.finish_reason
            self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
            return chunks
        raise TypeError(f"unexpected backend event {type(ev).__name__}")

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def final_chunks(self) -> list[ChatCompletionChunk]:
        """The finish_reason chunk, and the usage chunk when stream_options.include_usage."""
        if not self.done:
            raise RuntimeError("the backend stream ended without a Finished event")
        chunks = [self._chunk(Delta(), self.finish_reason)]
        if self.include_usage:
            chunks.append(
                ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())
            )
        return chunks

    def waveform(self) -> np.ndarray:  # [n] float32 at 24 kHz
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)

    def response(self) -> ChatCompletionResponse:
        if not self.done:
            raise RuntimeError("the backend stream ended without a Finished event")
        text = "".join(self.text)
        audio = None
        if self.speak:
            pcm = self.waveform()
            raw = encode_audio(pcm, self.audio_format, AUDIO_SAMPLE_RATE)
            audio = ChatCompletionAudio(
                id=self.audio_id,
                data=base64.b64encode(raw).decode("ascii"),
                transcript=text,
                expires_at=self.created + AUDIO_EXPIRY_S,
            )
        if self.vllm and audio is not None:  # text and audio as two choices
            choices = [
                Choice(index=0, message=AssistantMessage(content=text), finish_reason=self.finish_reason),
                Choice(index=1, message=AssistantMessage(content=None, audio=audio), finish_reason=self.finish_reason),
            ]
        else:
            choices = [Choice(message=AssistantMessage(content=text, audio=audio), finish_reason=self.finish_reason)]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )


# ---------------------------------------------------------------------------------------------------- wire helpers
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "server_overloaded",
}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> ErrorResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def sse(payload) -> str:
    """One server-sent event: `data: {json}\\n\\n` (a pydantic model or an already-encoded JSON string)."""
    body = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {body}\n\n"
