"""The OpenAI chat-completions wire format (pydantic v2): the request as the official SDK and vllm-omni's clients send
it, the response, the streamed chunk, the model list and the error body. Unknown request fields are ignored.

Extensions follow vLLM's names: `top_k` (-1 off), `repetition_penalty`, `seed`, `stop_token_ids`,
`mm_processor_kwargs.use_audio_in_video`, `sampling_params_list` ([thinker, talker, vocoder]) and
`video_url.num_frames`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "ImageURL",
    "AudioURL",
    "VideoURL",
    "InputAudio",
    "TextContent",
    "ImageContent",
    "InputAudioContent",
    "AudioURLContent",
    "VideoURLContent",
    "ContentPart",
    "ChatMessage",
    "AudioParams",
    "StreamOptions",
    "StageSamplingParams",
    "ChatCompletionRequest",
    "ChatCompletionAudio",
    "AssistantMessage",
    "Choice",
    "Usage",
    "ChatCompletionResponse",
    "DeltaAudio",
    "Delta",
    "StreamChoice",
    "ChatCompletionChunk",
    "ModelCard",
    "ModelList",
    "ErrorInfo",
    "ErrorResponse",
    "MMProcessorKwargs",
    "SpeechRequest",
    "PART_TYPES",
    "MAX_SPEECH_INPUT",
]

PART_TYPES = ("text", "image_url", "input_audio", "audio_url", "video_url")  # content part types this server reads

# Ranges checked at the edge, before any stage sees the request (NaN and infinities are refused everywhere)
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]  # 0: greedy
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, le=1_000_000)]  # -1 (or 0): off
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1, le=2**31 - 1)]  # the server's own limit is checked after (400 past it)
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(max_length=256)]
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM more
MAX_MESSAGES = 1024
MAX_SPEECH_INPUT = 4096  # characters of /v1/audio/speech `input` (OpenAI's limit)


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------------- request
class ImageURL(_In):
    url: str  # data: URI, http(s) URL (when allowed) or a local path inside --allowed-local-media-path
    detail: Optional[str] = None  # OpenAI's hint; ignored


class AudioURL(_In):
    url: str


class VideoURL(_In):
    url: str
    num_frames: Optional[int] = Field(None, ge=1, le=100_000)  # vllm-omni: sample this many frames over the video


class InputAudio(_In):
    data: str  # base64 of an audio file
    format: str = "wav"  # wav, mp3, flac, ... (the decoder sniffs the bytes; this is a hint)


class TextContent(_In):
    type: Literal["text"] = "text"
    text: str


class ImageContent(_In):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class InputAudioContent(_In):
    type: Literal["input_audio"] = "input_audio"
    input_audio: InputAudio


class AudioURLContent(_In):
    type: Literal["audio_url"] = "audio_url"
    audio_url: AudioURL


class VideoURLContent(_In):
    type: Literal["video_url"] = "video_url"
    video_url: VideoURL


ContentPart = Union[TextContent, ImageContent, InputAudioContent, AudioURLContent, VideoURLContent]
_PART_MODELS = {
    "text": TextContent,
    "image_url": ImageContent,
    "input_audio": InputAudioContent,
    "audio_url": AudioURLContent,
    "video_url": VideoURLContent,
}
_URL_FIELDS = ("image_url", "audio_url", "video_url")


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant"]  # developer is OpenAI's new name for system
    content: Union[str, list[ContentPart], None] = None  # None only for assistant turns (read as "")

    @model_validator(mode="after")
    def _content_needed(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content (a string or a list of parts)")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content: Any) -> Any:
        """Pick each part's model by its `type`, so an unsupported type is named in the error; a bare string URL
        (`"image_url": "data:..."`) is accepted as {"url": ...}."""
        if not isinstance(content, list):
            return content
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, BaseModel):
                parts.append(part)
                continue
            if not isinstance(part, dict):
                raise ValueError(f"content[{i}] must be an object with a `type`, got {type(part).__name__}")
            kind = part.get("type")
            if kind not in _PART_MODELS:
                raise ValueError(
                    f"unsupported content part type {kind!r} in content[{i}]; supported: {', '.join(PART_TYPES)}"
                )
            if kind in _URL_FIELDS and isinstance(part.get(kind), str):
                part = {**part, kind: {"url": part[kind]}}
            try:
                parts.append(_PART_MODELS[kind].model_validate(part))
            except ValidationError as e:  # say which part: a nested model's error loses the list index
                where = ", ".join(
                    f"content[{i}]." + ".".join(map(str, err["loc"])) + f": {err['msg']}" for err in e.errors()[:3]
                )
                raise ValueError(where) from None
        return parts


class AudioParams(_In):
    voice: Optional[str] = None  # a voice of the checkpoint (Chelsie, Ethan); None: the default voice
    format: str = "wav"  # wav (24 kHz mono PCM16), pcm16 / pcm (raw little-endian samples), mp3, opus, flac, aac

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_id(cls, v: Any) -> Any:
        return v.get("id") if isinstance(v, dict) else v  # OpenAI's custom-voice object {"id": ...}


class StreamOptions(_In):
    include_usage: bool = False  # one more chunk, with empty choices and the usage, before [DONE]


class MMProcessorKwargs(_In):
    use_audio_in_video: bool = False  # feed each video's audio track too (interleaved with its frames)


class StageSamplingParams(_In):
    """One entry of vllm-omni's `sampling_params_list`; fields left out keep the stage's default."""

    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    max_tokens: Optional[MaxTokens] = None
    seed: Optional[Seed] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    stop_token_ids: Optional[TokenIds] = None


class ChatCompletionRequest(_In):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: Optional[str] = None  # must be the served name when given
    modalities: Optional[list[Literal["text", "audio"]]] = None  # None: ["text"]
    audio: Optional[AudioParams] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[MaxTokens] = None
    max_completion_tokens: Optional[MaxTokens] = None  # OpenAI's newer name; wins over max_tokens
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    seed: Optional[Seed] = None
    stop: Union[str, Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)], None] = None  # not in the output
    stop_token_ids: Optional[TokenIds] = None
    n: int = 1  # only 1 is served
    mm_processor_kwargs: Optional[MMProcessorKwargs] = None
    sampling_params_list: Optional[Annotated[list[Optional[StageSamplingParams]], Field(max_length=3)]] = None
    #                                                                        [thinker, talker, vocoder]
    speaker: Optional[str] = None  # vllm-omni's name for audio.voice (audio.voice wins when both are given)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: only one choice per request")
        return self

    @property
    def speak(self) -> bool:
        return bool(self.modalities) and "audio" in self.modalities

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)

    @property
    def use_audio_in_video(self) -> bool:
        return self.mm_processor_kwargs is not None and self.mm_processor_kwargs.use_audio_in_video


class SpeechRequest(_In):
    """OpenAI's POST /v1/audio/speech: the model reads `input` aloud, verbatim."""

    model: Optional[str] = None  # must be the served name when given
    input: str = Field(min_length=1, max_length=MAX_SPEECH_INPUT)  # the text to speak
    voice: Optional[str] = None  # a voice of the model (GET /v1/audio/voices); None: the default voice
    response_format: Literal["wav", "pcm", "mp3", "opus", "flac", "aac"] = "mp3"  # OpenAI's default
    instructions: Optional[str] = Field(None, max_length=MAX_SPEECH_INPUT)  # how to speak: goes into the conversation
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False)  # OpenAI's range; only 1.0 is served
    stream_format: Literal["audio", "sse"] = "audio"  # audio: the encoded bytes as they come; sse: speech.audio.*
    seed: Optional[Seed] = None  # extension: sample the Talker reproducibly
    sampling_params_list: Optional[Annotated[list[Optional[StageSamplingParams]], Field(max_length=3)]] = None
    #                                                     extension, as in chat: [thinker (unused), talker, vocoder]

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_id(cls, v: Any) -> Any:
        return v.get("id") if isinstance(v, dict) else v  # OpenAI's custom-voice object {"id": ...}

    @field_validator("input")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("input must contain text to speak")
        return v


# ---------------------------------------------------------------------------------------------------- response
class ChatCompletionAudio(BaseModel):
    id: str
    data: str  # base64 of a WAV file (24 kHz mono PCM16), or of raw PCM16 when audio.format is pcm16
    transcript: str
    expires_at: int  # unix seconds; nothing is stored server-side, so multi-turn references are not served


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    audio: Optional[ChatCompletionAudio] = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[str] = None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # text tokens (codec tokens are not billed as completion tokens)
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Optional[Usage] = None


class DeltaAudio(BaseModel):
    id: Optional[str] = None
    data: Optional[str] = None  # base64 PCM16 mono, 24 kHz, little-endian
    transcript: Optional[str] = None
    expires_at: Optional[int] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    audio: Optional[DeltaAudio] = None


class StreamChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None

    @field_serializer("delta")
    def _sparse(self, delta: Delta) -> dict:
        return delta.model_dump(exclude_none=True)  # a delta carries only what changed


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Optional[Usage] = None
    modality: Optional[Literal["text", "audio"]] = None  # vllm-omni dialect only (left out of OpenAI's chunks)

    @model_serializer(mode="wrap")
    def _no_null_modality(self, handler):
        out = handler(self)
        if out.get("modality") is None:
            out.pop("modality", None)
        return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omni"
    root: Optional[str] = None  # the checkpoint behind the served name
    max_model_len: Optional[int] = None
    speaks: Optional[bool] = None  # the model has speech output (chat audio, /v1/audio/speech)
    voices: Optional[list[str]] = None  # its voices


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, server_error, ...
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
