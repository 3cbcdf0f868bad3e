"""The staged pipeline in one process, without Ray: the composition's recipe (serve/compose.py) over in-process
stage objects: prompt building, batched encoders, the continuous-batching Thinker, the streaming Talker and the
chunked vocoder (serve/stages.py).

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
from collections.abc import AsyncIterator
from typing import Optional

import torch

from omni.checkpoint import LoadedModel, load_model
from omni.types import ChatRequest, Generation, MediaEmbeddings, PreparedPrompt, PromptLayout
from omni.decoders import VocoderLoop
from omni.encoders import AudioEncoder, VisionEncoder, encode_prompt
from omni.serve.compose import Composition, prepare_checked
from omni.serve.config import PipelineConfig
from omni.serve.encoder_cache import EncoderCache
from omni.serve.models import talker_of, thinker_of, vocoder_of
from omni.serve.stages import StageGroup, TalkerStage, ThinkerStage, VocoderStage

__all__ = ["Pipeline", "LocalStages", "PipelineConfig"]


class LocalStages:
    """Every stage as an object of this process (serve/compose.py's `Stages`), the implementations of the loaded
    checkpoint's architecture (serve/models.py)."""

    def __init__(self, loaded: LoadedModel, config: PipelineConfig):
        self.loaded, self.config = loaded, config
        self.processor = loaded.processor
        model = loaded.model
        # the towers are shared with the loaded model: keep them on its device and dtype
        enc = dataclasses.replace(
            config.encoder, device=str(loaded.device), dtype=str(model.thinker.dtype).removeprefix("torch.")
        )
        self.vision = VisionEncoder.for_tower(model.thinker.model.visual, enc)
        self.audio = AudioEncoder.for_tower(model.thinker.model.audio_tower, enc)
        self.thinker = thinker_of(loaded, config.thinker, config.max_model_len)
        self.chain: dict[str, object] = {}
        self.has_speech = loaded.has_speech
        if self.has_speech:
            self.talker = talker_of(loaded, config)
            self.vocoder_loop = VocoderLoop(vocoder_of(loaded, config, str(loaded.device)))
            self.chain = {"talker": TalkerStage(self.talker), "vocoder": VocoderStage(self.vocoder_loop)}
        self.root = ThinkerStage(self.thinker)
        self.group = StageGroup(self.root, self.chain)  # every generating stage, hand-offs in process

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def voices(self) -> list[str]:
        return self.loaded.voices if self.has_speech else []

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def vocoder(self):  # Token2Wav (Qwen2.5) or Code2Wav (Qwen3)
        return self.vocoder_loop.vocoder

    async def prepare(self, request: ChatRequest) -> PreparedPrompt:
        return await prepare_checked(self.processor, request, self.max_model_len)

    async def encode(self, prompt: PreparedPrompt) -> MediaEmbeddings:
        return await asyncio.to_thread(encode_prompt, prompt, self.vision, self.audio)

    def stage_stats(self) -> dict[str, dict]:
        """Per generating stage: its counters and loop accounting (omni.loop.LoopStats, running, waiting)."""
        return self.group.stats()

    def generate(self, gen: Generation, prompt: PromptLayout, media: MediaEmbeddings) -> AsyncIterator:
        return self.group.run(gen, prompt=prompt, media=media)


class Pipeline(Composition):
    """The recipe over LocalStages; its stages are reachable as attributes (`pipeline.thinker.engine`, ...)."""

    def __init__(self, loaded: LoadedModel, config: PipelineConfig = PipelineConfig()):
        if loaded.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // 3))
        super().__init__(LocalStages(loaded, config), EncoderCache(config.encoder_cache_bytes))

    def __getattr__(self, name: str):  # loaded, processor, vision, audio, thinker, talker, vocoder, vocoder_loop
        stages = self.__dict__.get("stages")
        if stages is None:
            raise AttributeError(name)
        return getattr(stages, name)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny",
        config: PipelineConfig = PipelineConfig(),
        device: Optional[str] = None,
        dtype: Optional[str] = None,
    ) -> Pipeline:
        return cls(load_model(model, device=device, dtype=dtype), config)
