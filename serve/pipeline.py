"""The staged pipeline in one process, without Ray: prompt building, batched encoders, the continuous-batching
Thinker, the streaming Talker and the chunked vocoder, composed as async streams (serve/stages.py).

    pipeline = Pipeline.from_pretrained("tiny")
    async for event in pipeline.stream(request):    # TextDelta / AudioChunk ..., then one Finished
        ...
    result = await pipeline.run(request)            # ChatResult: text, token ids, codec ids, waveform

Many concurrent `stream` calls share the stages: one batched Thinker forward per step, one batched Talker forward per
step, one batched vocoder call per round of ready chunks. `omni chat` and the tests use it; the Ray Serve app hosts
the same stage classes in separate deployments.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import numpy as np
import torch

from omni.checkpoint import LoadedModel, load_model
from omni.engine import EngineConfig
from omni.prompt import prepare_prompt
from omni.talker import Talker, TalkerDone
from omni.thinker import Thinker, ThinkerDone, check_context
from omni.types import (AudioChunk, ChatRequest, ChatResult, Event, Finished, InvalidRequest, PreparedPrompt,
                        TextDelta)
from omni.decoders.token2wav import Token2Wav, VocoderConfig
from omni.encoders import AudioEncoder, EncoderConfig, VisionEncoder, encode_prompt
from omni.serve.stages import VocoderLoop, talker_stream, vocoder_stream

__all__ = ["Pipeline", "PipelineConfig", "vocoder_seed", "check_request", "prepare_checked", "finish", "collect"]


@dataclass(frozen=True)
class PipelineConfig:
    thinker: EngineConfig = field(default_factory=EngineConfig)  # Thinker batch (max_num_seqs)
    talker: EngineConfig = field(default_factory=lambda: EngineConfig(batch_wait_s=0.01))  # Talker batch
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)  # chunk schedule and context
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # encoder batch limits
    max_model_len: int = 32768  # prompt + max_tokens at most
    talker_emit_every: int = 4  # codec ids per Talker -> vocoder hand-off (latency vs. overhead)
    cpu_threads: Optional[int] = None  # torch intra-op threads on CPU; None: cores // 3 (three stages run at once,
    #                                    and oversubscribed OpenMP threads slow a busy CPU down ~10x)


def vocoder_seed(request: ChatRequest) -> int:
    """The vocoder's noise seed: explicit, else the Talker's, else the Thinker's, else 0 (what the reference path's
    `torch.manual_seed(0)` gives), so the same codes give the same speech."""
    for s in (request.vocoder_seed, request.talker_sampling.seed, request.sampling.seed):
        if s is not None:
            return int(s)
    return 0


class Pipeline:
    def __init__(self, loaded: LoadedModel, config: PipelineConfig = PipelineConfig()):
        self.loaded, self.config = loaded, config
        if loaded.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // 3))
        self.processor = loaded.processor
        model = loaded.model
        # the towers are shared with the loaded model: keep them on its device and dtype
        enc = dataclasses.replace(config.encoder, device=str(loaded.device),
                                  dtype=str(model.thinker.dtype).removeprefix("torch."))
        self.vision = VisionEncoder(model.thinker.model.visual, enc)
        self.audio = AudioEncoder(model.thinker.model.audio_tower, enc)
        self.thinker = Thinker(model.thinker, loaded.processor.tokenizer, config.thinker, config.max_model_len)
        self.has_speech = getattr(model, "has_talker", False)
        if self.has_speech:
            self.talker = Talker.from_model(model, config.talker, emit_every=config.talker_emit_every)
            self.vocoder = Token2Wav(model.token2wav, model.speaker_map, config.vocoder)
            self.vocoder_loop = VocoderLoop(self.vocoder)

    @classmethod
    def from_pretrained(cls, model: str = "tiny", config: PipelineConfig = PipelineConfig(),
                        device: Optional[str] = None, dtype: Optional[str] = None) -> "Pipeline":
        return cls(load_model(model, device=device, dtype=dtype), config)

    # ------------------------------------------------------------------------------------------------ Backend API
    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def voices(self) -> list[str]:
        return self.loaded.voices if self.has_speech else []

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def validate(self, request: ChatRequest) -> None:
        check_request(request, self.voices, self.max_model_len)

    async def prepare(self, request: ChatRequest) -> PreparedPrompt:
        return await prepare_checked(self.processor, request, self.max_model_len)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        self.validate(request)
        t0 = time.perf_counter()
        prompt = await self.prepare(request)
        t1 = time.perf_counter()
        media = await asyncio.to_thread(encode_prompt, prompt, self.vision, self.audio)
        stages = {"prepare": t1 - t0, "encode": time.perf_counter() - t1}
        items = self.thinker.generate(request.request_id, prompt, media, request.sampling, for_talker=request.speak)
        if request.speak:
            items = talker_stream(self.talker, items, request.request_id, request.voice, request.talker_sampling)
            items = vocoder_stream(self.vocoder_loop, items, request.voice, vocoder_seed(request),
                                   max_codes=request.talker_sampling.max_tokens)
        async for event in finish(items, prompt_tokens=int(prompt.input_ids.shape[0]), stage_seconds=stages):
            yield event

    async def run(self, request: ChatRequest) -> ChatResult:
        return await collect(self.stream(request))


def check_request(request: ChatRequest, voices: list[str], max_model_len: int) -> None:
    """Checks that need no model work (shared by the in-process and the Ray backends); raises InvalidRequest."""
    if not request.messages:
        raise InvalidRequest("messages must not be empty", "messages")
    request.sampling.validate("sampling")
    if request.sampling.max_tokens > max_model_len:
        raise InvalidRequest(f"max_tokens ({request.sampling.max_tokens}) exceeds the model's context of "
                             f"{max_model_len} tokens", "max_tokens", "context_length_exceeded")
    if request.speak:
        if not voices:
            raise InvalidRequest("this model has no speech output (talker disabled)", "modalities")
        if request.voice not in voices:
            raise InvalidRequest(f"unknown voice {request.voice!r}; valid voices: {', '.join(voices)}",
                                 "audio.voice", "invalid_voice")
        request.talker_sampling.validate("talker")


async def prepare_checked(processor, request: ChatRequest, max_model_len: int) -> PreparedPrompt:
    """The prompt (processor in a worker thread), with processor failures and context overflow as InvalidRequest."""
    try:
        prompt = await asyncio.to_thread(prepare_prompt, processor, request)
    except InvalidRequest:
        raise
    except (ValueError, TypeError) as exc:  # the processor rejects what it cannot read
        raise InvalidRequest(f"could not process the request's media: {exc}") from exc
    check_context(int(prompt.input_ids.shape[0]), request.sampling, max_model_len)
    return prompt


async def finish(items: AsyncIterator, prompt_tokens: int,
                 stage_seconds: Optional[dict] = None) -> AsyncIterator[Event]:
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
    reason = thinker_done.finished.finish_reason
    yield Finished(reason, prompt_tokens, len(thinker_done.token_ids),
                   len(talker_done.codes) if talker_done else 0, token_ids=thinker_done.token_ids,
                   codec_ids=talker_done.codes if talker_done else [], stage_seconds=stages)


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
    return ChatResult(text="".join(text), token_ids=list(fin.token_ids), codec_ids=list(fin.codec_ids), waveform=wav,
                      finish_reason=fin.finish_reason, prompt_tokens=fin.prompt_tokens)
