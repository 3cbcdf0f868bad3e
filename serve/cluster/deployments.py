"""The Ray Serve deployments: plain classes hosting the pipeline's stages, one stage each, and `HandleStages`, the
composition's `Stages` over their DeploymentHandles (the same recipe as in process: serve/compose.py).

Speech requests flow as a pull chain of streaming handle calls, so no stage needs sticky routing:
    Ingress --stream--> Vocoder.generate --stream--> Talker.generate --stream--> Thinker.generate
Each generation deployment runs its stage (serve/stages.py, the same classes the in-process pipeline chains) over its
upstream deployment's handle stream. Text-only requests call the Thinker directly. Encoders are called once per media
item; `@serve.batch` merges items of concurrent requests into one forward. Cancelling a stream (client gone) cancels
the upstream call, which frees the request's slot in every engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator, Callable, Optional

import torch
from ray import serve

from omni.checkpoint import load_model, resolve_model
from omni.types import ChatRequest, Generation, MediaEmbeddings, PreparedPrompt
from omni.serve.compose import SPEECH_CHAIN, Composition, prepare_checked
from omni.serve.config import DeploymentOptions, ServeConfig
from omni.serve.models import load_thinker, load_vocoder, talker_of
from omni.serve.stages import TalkerStage, ThinkerStage, VocoderStage

__all__ = ["VisionEncoderDeployment", "AudioEncoderDeployment", "ThinkerDeployment", "TalkerDeployment",
           "VocoderDeployment", "HandleStages", "Ingress", "Encoded", "CHAIN_DEPLOYMENTS"]

log = logging.getLogger("omni.serve")


def _cpu_threads(cfg: ServeConfig, opts: DeploymentOptions) -> None:
    if not cfg.device.startswith("cuda"):  # one replica per process: its reserved CPUs are its threads
        torch.set_num_threads(cfg.cpu_threads or max(1, int(opts.num_cpus)))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An encoder deployment's answer for one item."""
    embeds: torch.Tensor  # [n_tokens, H] float32, CPU
    batch_size: int  # items in the forward that computed it (the batching metric)
    deepstack: Optional[torch.Tensor] = None  # [n_levels, n_tokens, H]: Qwen3 vision only


class _EncoderDeployment:
    """Shared body of the two encoders: items of concurrent requests batched by @serve.batch."""

    def _setup(self, cls, model: str, cfg: ServeConfig, opts) -> None:
        _cpu_threads(cfg, opts)
        enc = dataclasses.replace(cfg.encoder, device=cfg.device, dtype=cfg.torch_dtype)
        self.encoder = cls.from_pretrained(model, enc)
        self.encode.set_max_batch_size(opts.max_batch_size)
        self.encode.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, items: list) -> list[Encoded]:
        """One item per call from the caller's side; a list here."""
        run = getattr(self.encoder, "encode_with_deepstack", None)  # vision: (embeds, deepstack or None) per item
        if run is None:
            return [Encoded(o, len(items)) for o in await asyncio.to_thread(self.encoder.encode, items)]
        return [Encoded(e, len(items), d) for e, d in await asyncio.to_thread(run, items)]


class VisionEncoderDeployment(_EncoderDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        from omni.encoders import VisionEncoder

        self._setup(VisionEncoder, model, cfg, cfg.deployments.vision_encoder)


class AudioEncoderDeployment(_EncoderDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        from omni.encoders import AudioEncoder

        self._setup(AudioEncoder, model, cfg, cfg.deployments.audio_encoder)


class _GenerationDeployment:
    """A generating stage over its upstream deployment's stream (None: the Thinker, the root)."""
    stage: object
    upstream: Optional[object] = None  # DeploymentHandle

    async def generate(self, gen: Generation, prompt: PreparedPrompt, media: MediaEmbeddings) -> AsyncIterator:
        if self.upstream is None:
            async for item in self.stage.run(gen, prompt, media):
                yield item
            return
        up = self.upstream.options(stream=True).generate.remote(gen, prompt, media)
        try:
            async for item in self.stage.run(gen, up):
                yield item
        finally:
            up.cancel()

    def stats(self) -> dict:
        return self.stage.stats()


class ThinkerDeployment(_GenerationDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        _cpu_threads(cfg, cfg.deployments.thinker)
        # the thinker's weights only, of the checkpoint's architecture (serve/models.py)
        self.stage = ThinkerStage(load_thinker(model, cfg.thinker, cfg.max_model_len, cfg.device, cfg.torch_dtype))


class TalkerDeployment(_GenerationDeployment):
    def __init__(self, model: str, cfg: ServeConfig, upstream):
        _cpu_threads(cfg, cfg.deployments.talker)
        loaded = load_model(model, device=cfg.device, dtype=cfg.torch_dtype)
        # keeps the talker, the voices and what it needs of the thinker's embedding table; the rest is dropped
        self.stage = TalkerStage(talker_of(loaded, cfg.talker))
        del loaded
        self.upstream = upstream


class VocoderDeployment(_GenerationDeployment):
    def __init__(self, model: str, cfg: ServeConfig, upstream):
        from omni.decoders import VocoderLoop

        _cpu_threads(cfg, cfg.deployments.vocoder)
        self.stage = VocoderStage(VocoderLoop(load_vocoder(model, cfg, cfg.device, cfg.torch_dtype)))
        self.upstream = upstream


# the deployment class of each stage of SPEECH_CHAIN, in the chain's order (each bound over the one before it)
CHAIN_DEPLOYMENTS = {"talker": TalkerDeployment, "vocoder": VocoderDeployment}
assert tuple(CHAIN_DEPLOYMENTS) == SPEECH_CHAIN


class HandleStages:
    """serve/compose.py's `Stages` over DeploymentHandles (runs in the ingress replica)."""

    def __init__(self, model: str, cfg: ServeConfig, vision, audio, thinker, speech, voices: list[str],
                 observe_batch: Optional[Callable[[str, int], None]] = None):
        from transformers import AutoProcessor

        self.model_name, self.cfg = model, cfg
        self.observe_batch = observe_batch  # (kind, items in the forward) per encoded item: the batching metric
        self.processor = AutoProcessor.from_pretrained(resolve_model(model))
        self.vision, self.audio = vision, audio  # encoder handles
        self.thinker, self.speech = thinker, speech  # the chain's root and its last stage
        self.voices = voices
        self.max_model_len = cfg.max_model_len

    async def prepare(self, request: ChatRequest) -> PreparedPrompt:
        return await prepare_checked(self.processor, request, self.max_model_len)

    async def encode(self, prompt: PreparedPrompt) -> MediaEmbeddings:
        images = [self.vision.encode.remote(it) for it in prompt.images]
        videos = [self.vision.encode.remote(it) for it in prompt.videos]
        audios = [self.audio.encode.remote(it) for it in prompt.audios]
        results = await asyncio.gather(*images, *videos, *audios)
        n_img, n_vid = len(images), len(videos)
        if self.observe_batch is not None:
            for i, r in enumerate(results):
                self.observe_batch("vision" if i < n_img + n_vid else "audio", r.batch_size)
        embeds = [r.embeds for r in results]
        deep = [r.deepstack for r in results[:n_img + n_vid]]  # Qwen3's vision deepstack features, else None
        return MediaEmbeddings(images=embeds[:n_img], videos=embeds[n_img:n_img + n_vid],
                               audios=embeds[n_img + n_vid:],
                               image_deepstack=[d for d in deep[:n_img] if d is not None],
                               video_deepstack=[d for d in deep[n_img:] if d is not None])

    async def generate(self, gen: Generation, prompt: PreparedPrompt, media: MediaEmbeddings) -> AsyncIterator:
        head = self.speech if gen.speak else self.thinker
        items = head.options(stream=True).generate.remote(gen, prompt, media)
        try:
            async for item in items:
                yield item
        finally:
            items.cancel()


@serve.ingress()
class Ingress:
    """FastAPI ingress (serve/api/server.py's app over the composition), built in the replica after the constructor."""

    def __init__(self, model: str, cfg: ServeConfig, settings, vision, audio, thinker, speech, voices: list[str]):
        from omni.serve.api.metrics import Metrics

        self.settings, self.metrics = settings, Metrics()
        stages = HandleStages(model, cfg, vision, audio, thinker, speech, voices, self.metrics.observe_encoder_batch)
        self.backend = Composition(stages)

    def __serve_build_asgi_app__(self):
        from omni.serve.api.server import build_fastapi

        return build_fastapi(self.backend, self.settings, self.metrics)
