"""What crosses a stage boundary: requests, decoded media, prepared prompts, hand-offs and stream events.

Every tensor field has its shape in a comment. H = thinker hidden size (== talker embedding_size).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch

__all__ = [
    "SamplingParams",
    "TALKER_DEFAULT_SAMPLING",
    "Video",
    "TextPart",
    "ImagePart",
    "AudioPart",
    "VideoPart",
    "Part",
    "Message",
    "ChatRequest",
    "VisionItem",
    "AudioItem",
    "PreparedPrompt",
    "PromptLayout",
    "MediaEmbeddings",
    "TalkerPrompt",
    "Qwen3TalkerPrompt",
    "ThinkerToTalker",
    "TalkerToVocoder",
    "ThinkerDone",
    "TalkerDone",
    "ThinkerItem",
    "TalkerItem",
    "Generation",
    "TextDelta",
    "AudioChunk",
    "Finished",
    "Event",
    "ChatResult",
    "OmniError",
    "InvalidRequest",
    "StageUnavailable",
    "check_voice",
    "AUDIO_SAMPLE_RATE",
    "INPUT_AUDIO_SAMPLE_RATE",
    "DEFAULT_VOICE",
]

AUDIO_SAMPLE_RATE = 24000  # speech out: 480 samples per codec token = 50 codes/s
INPUT_AUDIO_SAMPLE_RATE = 16000  # audio in: Whisper features at 16 kHz
DEFAULT_VOICE = "Chelsie"  # Qwen2.5-Omni's default speaker (a key of the checkpoint's spk_dict.pt)


class OmniError(Exception):
    """Base of the errors this project raises on purpose."""


class InvalidRequest(OmniError, ValueError):
    """The request itself is wrong (unknown voice, bad sampling value, too many tokens): a 400 for HTTP clients."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class StageUnavailable(OmniError):
    """A stage could not serve the request: its replica died mid-request, or none is up yet (Serve restarts it). Not
    the request's fault, and retrying later succeeds: a 503 with Retry-After for HTTP clients."""


def check_voice(voice: str, voices) -> None:
    """The one voice check of every stage and entry point: an unknown voice fails loudly, naming the valid ones."""
    if voice not in voices:
        raise InvalidRequest(
            f"unknown voice {voice!r}; valid voices: {', '.join(sorted(voices))}", "audio.voice", "invalid_voice"
        )


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept; 1.0 is off
    top_k: int = -1  # -1 (or 0) is off, as in vLLM
    repetition_penalty: float = 1.0  # 1.0 is off; HF's multiplicative penalty over prompt + generated ids
    max_tokens: int = 256  # generated tokens at most (the EOS token counts)
    seed: Optional[int] = None  # per-request generator seed; None draws a fresh one
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end generation (kept in the output, like EOS)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self, name: str = "sampling") -> SamplingParams:
        for f in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, f)):
                raise InvalidRequest(f"{name}.{f} must be a finite number, got {getattr(self, f)}", f)
        if self.temperature < 0:
            raise InvalidRequest(f"{name}.temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"{name}.top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidRequest(f"{name}.top_k must be -1 (off) or >= 0, got {self.top_k}", "top_k")
        if self.repetition_penalty <= 0:
            raise InvalidRequest(
                f"{name}.repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty"
            )
        if self.max_tokens < 1:
            raise InvalidRequest(f"{name}.max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        return self


# The Talker's defaults in Qwen2_5OmniForConditionalGeneration.generate (talker_do_sample=True, ...)
TALKER_DEFAULT_SAMPLING = SamplingParams(temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, max_tokens=4096)


# ---------------------------------------------------------------------------------------------------- decoded media
@dataclass
class Video:
    frames: np.ndarray  # [T, H, W, 3] uint8, already sampled at `fps` and resized
    fps: float  # frames per second of `frames` (the sampling rate, not the source's)
    audio: Optional[np.ndarray] = None  # [n] float32 mono 16 kHz: the video's own audio track, if it has one


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    image: object  # PIL.Image.Image in RGB


@dataclass
class AudioPart:
    audio: np.ndarray  # [n] float32 mono 16 kHz


@dataclass
class VideoPart:
    video: Video


Part = Union[TextPart, ImagePart, AudioPart, VideoPart]


@dataclass
class Message:
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Part]]


@dataclass
class ChatRequest:
    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)  # the Thinker's
    talker_sampling: SamplingParams = TALKER_DEFAULT_SAMPLING  # the Talker's
    speak: bool = False  # True: text and speech; False: text only
    voice: str = DEFAULT_VOICE  # a key of the checkpoint's spk_dict.pt
    use_audio_in_video: bool = False  # interleave each video's audio track with its frames
    vocoder_seed: Optional[int] = None  # seed of the vocoder's noise (None: the Talker's, else the Thinker's, else 0)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    forced_reply: Optional[str] = None  # the reply's text, known in advance (text to speech): the Thinker only reads it
    # how the one check (omni.serve.compose.check_request) names the Thinker's and the Talker's sampling in its errors:
    # the HTTP layer sets the wire's names ("sampling", "sampling_params_list[1]")
    sampling_names: tuple[str, str] = ("sampling", "talker")

    @property
    def generation(self) -> Generation:
        """What the generating stages need (no messages: the media is in the prompt and its embeddings)."""
        seed = next(
            (int(s) for s in (self.vocoder_seed, self.talker_sampling.seed, self.sampling.seed) if s is not None), 0
        )  # 0: what the reference path's torch.manual_seed(0) gives
        return Generation(
            self.request_id, self.sampling, self.speak, self.voice, self.talker_sampling, seed, self.forced_reply
        )


@dataclass(frozen=True)
class Generation:
    """The part of a request that crosses into the generating stages (Thinker -> Talker -> vocoder)."""

    request_id: str
    sampling: SamplingParams  # the Thinker's
    speak: bool = False  # the Talker and the vocoder run too
    voice: str = DEFAULT_VOICE
    talker_sampling: SamplingParams = TALKER_DEFAULT_SAMPLING
    vocoder_seed: int = 0  # the vocoder's noise seed, resolved (same codes + same seed -> same speech)
    forced_reply: Optional[str] = None  # the reply's text when known in advance (one Thinker prefill, no decoding)


# ---------------------------------------------------------------------------------------------------- prepared prompt
@dataclass
class VisionItem:
    pixel_values: torch.Tensor  # [n_patches, 3 * temporal_patch * patch * patch] (1176 for Qwen2.5)
    grid_thw: torch.Tensor  # [3] long: temporal, height, width patches; tokens = t * h * w / merge_size**2
    merge_size: int = 2  # the processor's spatial merge: merge_size x merge_size patches per token

    @property
    def num_tokens(self) -> int:
        return int(self.grid_thw.prod()) // self.merge_size**2


@dataclass
class AudioItem:
    features: torch.Tensor  # [n_mels=128, n_frames] Whisper log-mel, valid frames only (100 frames/s)


@dataclass
class PreparedPrompt:
    input_ids: torch.Tensor  # [L] long, placeholders already expanded to one id per media token
    images: list[VisionItem]  # in prompt order
    videos: list[VisionItem]  # in prompt order
    audios: list[AudioItem]  # in prompt order (with use_audio_in_video: each video's track at its video's place)
    video_second_per_grid: Optional[torch.Tensor]  # [n_videos] float: seconds covered by one temporal grid step
    use_audio_in_video: bool = False

    @property
    def image_grid_thw(self) -> Optional[torch.Tensor]:  # [n_images, 3]
        return torch.stack([i.grid_thw for i in self.images]) if self.images else None

    @property
    def video_grid_thw(self) -> Optional[torch.Tensor]:  # [n_videos, 3]
        return torch.stack([v.grid_thw for v in self.videos]) if self.videos else None

    @property
    def audio_seqlens(self) -> Optional[torch.Tensor]:  # [n_audios] long: feature frames per audio
        return torch.tensor([a.features.shape[-1] for a in self.audios], dtype=torch.long) if self.audios else None

    @property
    def layout(self) -> PromptLayout:
        """What the generating stages read of this prompt (its encoder inputs stay behind)."""
        return PromptLayout(
            self.input_ids,
            self.image_grid_thw,
            self.video_grid_thw,
            self.audio_seqlens,
            self.video_second_per_grid,
            self.use_audio_in_video,
        )


@dataclass
class PromptLayout:
    """A prepared prompt as the generating stages read it: the ids and the media's shapes (grids, lengths: what the
    TMRoPE positions are computed from), never the pixels or features; the media enter as MediaEmbeddings. A few
    hundred bytes beside the prompt's ids, whatever the media."""

    input_ids: torch.Tensor  # [L] long, placeholders already expanded to one id per media token
    image_grid_thw: Optional[torch.Tensor]  # [n_images, 3]
    video_grid_thw: Optional[torch.Tensor]  # [n_videos, 3]
    audio_seqlens: Optional[torch.Tensor]  # [n_audios] long: feature frames per audio
    video_second_per_grid: Optional[torch.Tensor]  # [n_videos] float: seconds covered by one temporal grid step
    use_audio_in_video: bool = False


@dataclass
class MediaEmbeddings:
    images: list[torch.Tensor] = field(default_factory=list)  # each [n_tokens_i, H], prompt order
    videos: list[torch.Tensor] = field(default_factory=list)  # each [n_tokens_i, H]
    audios: list[torch.Tensor] = field(default_factory=list)  # each [n_tokens_i, H]
    # Qwen3-Omni's deepstack: features of early vision-tower layers, added to the Thinker's first n_levels layers at
    # the same placeholder tokens; [] for Qwen2.5
    image_deepstack: list[torch.Tensor] = field(default_factory=list)  # each [n_levels, n_tokens_i, H]
    video_deepstack: list[torch.Tensor] = field(default_factory=list)  # each [n_levels, n_tokens_i, H]

    @classmethod
    def assemble(cls, images: list, videos: list, audios: list[torch.Tensor]) -> MediaEmbeddings:
        """One request's embeddings from its encoders' per-item results in prompt order: images and videos as
        (embeds, deepstack or None) pairs (the vision encoder's `encode_with_deepstack`), audios as embeds."""
        return cls(
            images=[e for e, _ in images],
            videos=[e for e, _ in videos],
            audios=list(audios),
            image_deepstack=[d for _, d in images if d is not None],
            video_deepstack=[d for _, d in videos if d is not None],
        )


# ---------------------------------------------------------------------------------------------------- hand-offs
@dataclass
class TalkerPrompt:
    """thinker_to_talker, once per request, after the Thinker's prefill."""

    input_ids: torch.Tensor  # [L] the Thinker's prompt ids
    prompt_embeds: torch.Tensor  # [L, H] h(p) + e(p): last hidden state + input embedding (e zeroed at media)
    first_token: int  # g_0, the Thinker's first generated token
    image_grid_thw: Optional[torch.Tensor]  # [n_images, 3]
    video_grid_thw: Optional[torch.Tensor]  # [n_videos, 3]
    audio_seqlens: Optional[torch.Tensor]  # [n_audios]
    video_second_per_grid: Optional[torch.Tensor]  # [n_videos]
    use_audio_in_video: bool = False


@dataclass
class Qwen3TalkerPrompt:
    """thinker_to_talker for Qwen3-Omni, once per request after the Thinker's prefill: what its talker's prompt is made
    of (omni/talker_qwen3.py). The system turn is not voiced; U = positions of the user turns (each from its
    <|im_start|> to the newline after its <|im_end|>)."""

    user_ids: torch.Tensor  # [U] long: the user turns' prompt ids (the talker's M-RoPE reads them)
    user_embeds: torch.Tensor  # [U, H] the Thinker's accept_hidden_layer output at media tokens, its input embedding
    #                            elsewhere
    user_media: torch.Tensor  # [U] bool: media tokens (talker.hidden_projection) vs text (talker.text_projection)
    assistant_embeds: torch.Tensor  # [t, H] input embeddings of the prompt's tail from its last <|im_start|>assistant
    image_grid_thw: Optional[torch.Tensor]  # [n_images, 3]
    video_grid_thw: Optional[torch.Tensor]  # [n_videos, 3]
    audio_seqlens: Optional[torch.Tensor]  # [n_audios] feature frames
    video_second_per_grid: Optional[torch.Tensor]  # [n_videos]


@dataclass
class ThinkerToTalker:
    """thinker_to_talker, once per generated text token g_k (k >= 0), in order."""

    index: int  # k
    token_id: int  # g_k
    reply: Optional[torch.Tensor]  # [H] Qwen2.5: R_k = h(g_k) + e(g_k), sent once g_k is fed; Qwen3: e(g_k), sent
    #                                once g_k is sampled. None when g_k is the last token (the talker never reads it)
    last: bool  # g_k ends the reply (EOS, stop id or max_tokens)


@dataclass
class TalkerToVocoder:
    """talker_to_vocoder: new codec ids of one request, in order."""

    codes: list  # new codes, the final stop code excluded: Qwen2.5 codec ids (one per 20 ms); Qwen3 frames, each
    #              [num_code_groups] ids (one frame per 80 ms)
    last: bool  # no more codes will come


@dataclass
class ThinkerDone:
    """The Thinker's last item for a request (the composition's `finish` makes the request's one Finished of it)."""

    finish_reason: Literal["stop", "length"]
    token_ids: list[int]  # all generated ids


@dataclass
class TalkerDone:
    """The Talker's last item for a request."""

    codes: list  # Qwen2.5: all generated codec ids (the stop code included when generated); Qwen3: all frames
    #              [n_frames][num_code_groups] (its stop code 2150 is no frame)
    finish_reason: Literal["stop", "length"]


# ---------------------------------------------------------------------------------------------------- events
@dataclass
class TextDelta:
    text: str  # decoded text, never a split multi-byte character
    token_ids: list[int]  # the tokens this delta completes


@dataclass
class AudioChunk:
    pcm: np.ndarray  # [n] float32 in [-1, 1], mono, AUDIO_SAMPLE_RATE
    sample_rate: int = AUDIO_SAMPLE_RATE


@dataclass
class Finished:
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    codec_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # generated text ids (EOS included when generated)
    codec_ids: list = field(default_factory=list)  # generated codec ids (stop code included when generated); Qwen3:
    #                                                frames [n][16]
    stage_seconds: dict[str, float] = field(default_factory=dict)  # per-stage latency of this request


Event = Union[TextDelta, AudioChunk, Finished]
ThinkerItem = Union[TextDelta, TalkerPrompt, Qwen3TalkerPrompt, ThinkerToTalker, ThinkerDone]  # Thinker.generate
TalkerItem = Union[TalkerToVocoder, TalkerDone]  # what the Talker adds to the stream (the rest passes through)


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]  # generated text ids, EOS included when it was generated
    codec_ids: list  # generated codec ids, stop code included when it was generated; Qwen3: frames [n][16]
    waveform: Optional[np.ndarray]  # [n] float32 at 24 kHz, None for text only
    finish_reason: str
    prompt_tokens: int
    sample_rate: int = AUDIO_SAMPLE_RATE
