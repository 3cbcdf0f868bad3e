"""The one composition of the stages: the recipe every backend runs, written once over a small stage interface.

    check -> prepare (chat template, processor) -> encode (vision/audio towers) -> generate -> finish
    generate = the Thinker, then, when speech is asked for, each stage of SPEECH_CHAIN over its upstream's stream

The request is checked once, here, where it enters (`check_request`: sampling, voice, limits -> a CheckedRequest,
which nothing else builds; `prepare_checked`: the context limit once the prompt's length is known). The stages trust
what they are given: the Thinker, the Talker and the vocoder validate nothing of it again.

Two implementations of `Stages`: in-process objects (serve/pipeline.py, `Pipeline`) and Ray DeploymentHandles
(serve/cluster/deployments.py). Both wrap their stages with `Composition`, which is the HTTP layer's `Backend`.
A new stage (Qwen3's Code2Wav) is a `Stage` implementation and a name in the chain; a new stage timing goes into
`finish`. No ray and no HTTP here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

import numpy as np

from omni.prompt import prepare_prompt
from omni.thinker import check_context
from omni.types import (
    AudioChunk,
    ChatRequest,
    ChatResult,
    Event,
    Finished,
    Generation,
    InvalidRequest,
    MediaEmbeddings,
    PreparedPrompt,
    PromptLayout,
    TalkerDone,
    TextDelta,
    ThinkerDone,
    check_voice,
)
from omni.serve.encoder_cache import EncoderCache

__all__ = [
    "SPEECH_CHAIN",
    "Stage",
    "Stages",
    "Composition",
    "CheckedRequest",
    "check_request",
    "prepare_checked",
    "prepare_and_check",
    "finish",
    "collect",
]

SPEECH_CHAIN: tuple[str, ...] = ("talker", "vocoder")  # the stages after the Thinker when speech is asked for, in order


_CHECKED = object()  # only check_request holds it


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed `check_request`, with what its generating stages get (its Generation). Only
    check_request builds one, so a function that takes it need not (and does not) check again."""

    request: ChatRequest
    generation: Generation
    _by: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self._by is not _CHECKED:
            raise TypeError("a CheckedRequest is built by omni.serve.compose.check_request only")


class Stage(Protocol):
    """A generating stage after the Thinker: consumes what is for it from its upstream's stream, passes the rest
    through, and adds its own items (serve/stages.py)."""

    def run(self, gen: Generation, upstream: AsyncIterator) -> AsyncIterator: ...


class Stages(Protocol):
    """What the recipe runs over."""

    model_name: str  # what the user asked for ("tiny", a path, a hub id)
    voices: list[str]  # [] when the model has no speech output
    max_model_len: int  # prompt + max_tokens at most

    async def prepare(self, request: ChatRequest) -> PreparedPrompt: ...

    async def encode(self, prompt: PreparedPrompt) -> MediaEmbeddings: ...

    def generate(self, gen: Generation, prompt: PromptLayout, media: MediaEmbeddings) -> AsyncIterator:
        """The Thinker and, for speech, SPEECH_CHAIN over it: TextDelta, AudioChunk and the done-markers. `prompt` is
        the prepared prompt's layout: the encoder inputs never reach the generating stages."""
        ...


class Composition:
    """The recipe over a `Stages`: `stream(request)` yields TextDelta / AudioChunk ..., then one Finished with the
    seconds each stage took; `run(request)` collects a ChatResult. Many concurrent calls share the stages."""

    def __init__(self, stages: Stages, encoder_cache: Optional[EncoderCache] = None):
        self.stages = stages
        self.encoder_cache = encoder_cache  # encoder outputs by content hash (serve/encoder_cache.py); None: off

    @property
    def model_name(self) -> str:
        return self.stages.model_name

    @property
    def voices(self) -> list[str]:
        return self.stages.voices

    @property
    def max_model_len(self) -> int:
        return self.stages.max_model_len

    def validate(self, request: ChatRequest) -> CheckedRequest:
        """The one check of a request (the HTTP layer calls it before its response starts, then streams the result)."""
        return check_request(request, self.voices, self.max_model_len)

    async def stream(self, request: Union[ChatRequest, CheckedRequest]) -> AsyncIterator[Event]:
        """A CheckedRequest runs as it is; a ChatRequest is checked first."""
        checked = request if isinstance(request, CheckedRequest) else self.validate(request)
        t0 = time.perf_counter()
        prompt = await self.stages.prepare(checked.request)
        t1 = time.perf_counter()
        media = await (
            self.encoder_cache.encode(prompt, self.stages.encode)
            if self.encoder_cache is not None
            else self.stages.encode(prompt)
        )
        seconds = {"prepare": t1 - t0, "encode": time.perf_counter() - t1}
        items = self.stages.generate(checked.generation, prompt.layout, media)
        async for event in finish(items, prompt_tokens=int(prompt.input_ids.shape[0]), stage_seconds=seconds):
            yield event

    async def run(self, request: Union[ChatRequest, CheckedRequest]) -> ChatResult:
        return await collect(self.stream(request))


def check_request(request: ChatRequest, voices: list[str], max_model_len: int) -> CheckedRequest:
    """The one check of a request, before any model work: messages, the Thinker's and (for speech) the Talker's
    sampling, max_tokens against the context, the voice. Raises InvalidRequest (a 400 for HTTP clients)."""
    if not request.messages:
        raise InvalidRequest("messages must not be empty", "messages")
    thinker_name, talker_name = request.sampling_names
    request.sampling.validate(thinker_name)
    if request.sampling.max_tokens > max_model_len:
        raise InvalidRequest(
            f"max_tokens ({request.sampling.max_tokens}) exceeds the model's context of {max_model_len} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    if request.speak:
        if not voices:
            raise InvalidRequest("this model has no speech output (talker disabled)", "modalities")
        request.talker_sampling.validate(talker_name)
        check_voice(request.voice, voices)
    return CheckedRequest(request, request.generation, _CHECKED)


def prepare_and_check(processor, request: ChatRequest, max_model_len: int) -> PreparedPrompt:
    """The prompt, with processor failures and context overflow as InvalidRequest (blocking: the processor)."""
    try:
        prompt = prepare_prompt(processor, request)
    except InvalidRequest:
        raise
    except (ValueError, TypeError) as exc:  # the processor rejects what it cannot read
        raise InvalidRequest(f"could not process the request's media: {exc}") from exc
    check_context(int(prompt.input_ids.shape[0]), request.sampling, max_model_len)
    return prompt


async def prepare_checked(processor, request: ChatRequest, max_model_len: int) -> PreparedPrompt:
    """`prepare_and_check` in a worker thread."""
    return await asyncio.to_thread(prepare_and_check, processor, request, max_model_len)


async def finish(
    items: AsyncIterator, prompt_tokens: int, stage_seconds: Optional[dict] = None
) -> AsyncIterator[Event]:
    """Pass TextDelta / AudioChunk through; turn the stages' done-markers into one final Finished event, with the
    seconds each generating stage took for this request (from the start of generation to its last output)."""
    thinker_done: Optional[ThinkerDone] = None
    talker_done: Optional[TalkerDone] = None
    stages = dict(stage_seconds or {})
    t0 = time.perf_counter()
    try:
        async for item in items:
            if isinstance(item, (TextDelta, AudioChunk)):
                if isinstance(item, AudioChunk):
                    stages["vocoder"] = time.perf_counter() - t0
                yield item
            elif isinstance(item, ThinkerDone):
                thinker_done = item
                stages["thinker"] = time.perf_counter() - t0
            elif isinstance(item, TalkerDone):
                talker_done = item
                stages["talker"] = time.perf_counter() - t0
    finally:
        aclose = getattr(items, "aclose", None)  # async generators; Ray's handle generators are cancelled by the caller
        if aclose is not None:
            await aclose()
    if thinker_done is None:
        raise RuntimeError("the generating stages ended without the Thinker's last item")
    codes = talker_done.codes if talker_done else []
    yield Finished(
        thinker_done.finish_reason,
        prompt_tokens,
        len(thinker_done.token_ids),
        len(codes),
        token_ids=thinker_done.token_ids,
        codec_ids=codes,
        stage_seconds=stages,
    )


async def collect(events: AsyncIterator[Event]) -> ChatResult:
    """A whole ChatResult from an event stream."""
    text, pcm, fin = [], [], None
    async for ev in events:
        if isinstance(ev, TextDelta):
            text.append(ev.text)
        elif isinstance(ev, AudioChunk):
            pcm.append(ev.pcm)
        elif isinstance(ev, Finished):
            fin = ev
    wav = np.concatenate(pcm).astype(np.float32) if pcm else (np.zeros(0, np.float32) if fin.codec_tokens else None)
    return ChatResult(
        text="".join(text),
        token_ids=list(fin.token_ids),
        codec_ids=list(fin.codec_ids),
        waveform=wav,
        finish_reason=fin.finish_reason,
        prompt_tokens=fin.prompt_tokens,
    )
