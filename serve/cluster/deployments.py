"""The Ray Serve deployments: plain classes hosting the pipeline's stages, one stage each, composed by handles.

Speech requests flow as a pull chain of streaming handle calls, so no stage needs sticky routing:
    Ingress --stream--> Vocoder.generate --stream--> Talker.generate --stream--> Thinker.generate
Each stage consumes its upstream's items, passes through what is not for it (text deltas), and yields its own
(serve/stages.py, the same functions the in-process pipeline chains). Text-only requests call the Thinker directly.
Encoders are called once per media item; `@serve.batch` merges items of concurrent requests into one forward.
Cancelling a stream (client gone) cancels the upstream call, which frees the request's slot in every engine.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import torch
from ray import serve

from omni.checkpoint import load_model, resolve_model
from omni.engine import EngineConfig
from omni.talker import Talker
from omni.thinker import Thinker
from omni.types import ChatRequest, MediaEmbeddings, PreparedPrompt
from omni.serve.config import ServeConfig
from omni.serve.pipeline import check_request, finish, prepare_checked, vocoder_seed
from omni.serve.stages import VocoderLoop, talker_stream, vocoder_stream

__all__ = ["VisionEncoderDeployment", "AudioEncoderDeployment", "ThinkerDeployment", "TalkerDeployment",
           "VocoderDeployment", "RayBackend", "Ingress"]

log = logging.getLogger("omni.serve")


def _dtype(cfg: ServeConfig):
    if cfg.dtype:
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32


def _cpu_threads(cfg: ServeConfig, opts) -> None:
    if not cfg.device.startswith("cuda"):  # one replica per process: its reserved CPUs are its threads
        torch.set_num_threads(max(1, int(opts.num_cpus)))


class _EncoderDeployment:
    """Shared body of the two encoders: items of concurrent requests batched by @serve.batch."""

    def _setup(self, encoder, opts) -> None:
        self.encoder = encoder
        self.encode.set_max_batch_size(opts.max_batch_size)
        self.encode.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, items: list) -> list[tuple[torch.Tensor, int]]:
        """One item per call from the caller's side; a list here. -> (embeddings [n_tokens, H], batch size)."""
        out = await asyncio.to_thread(self.encoder.encode, items)
        return [(o, len(items)) for o in out]


class VisionEncoderDeployment(_EncoderDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        from omni.encoders import EncoderConfig, VisionEncoder

        _cpu_threads(cfg, cfg.vision_encoder)
        enc = EncoderConfig(device=cfg.device, dtype=str(_dtype(cfg)).removeprefix("torch."))
        self._setup(VisionEncoder.from_pretrained(model, enc), cfg.vision_encoder)


class AudioEncoderDeployment(_EncoderDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        from omni.encoders import AudioEncoder, EncoderConfig

        _cpu_threads(cfg, cfg.audio_encoder)
        enc = EncoderConfig(device=cfg.device, dtype=str(_dtype(cfg)).removeprefix("torch."))
        self._setup(AudioEncoder.from_pretrained(model, enc), cfg.audio_encoder)


class ThinkerDeployment:
    def __init__(self, model: str, cfg: ServeConfig):
        from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

        _cpu_threads(cfg, cfg.thinker)
        path = resolve_model(model)
        net = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=_dtype(cfg))
        net = net.to(cfg.device).eval()
        ec = EngineConfig(max_num_seqs=cfg.thinker.max_num_seqs, batch_wait_s=cfg.thinker.batch_wait_s)
        self.thinker = Thinker(net, AutoTokenizer.from_pretrained(path), ec, cfg.max_model_len)

    async def generate(self, request_id: str, prompt: PreparedPrompt, media: MediaEmbeddings, sampling,
                       for_talker: bool) -> AsyncIterator:
        async for item in self.thinker.generate(request_id, prompt, media, sampling, for_talker):
            yield item

    def stats(self) -> dict:
        return self.thinker.engine.stats()


class TalkerDeployment:
    def __init__(self, model: str, cfg: ServeConfig, thinker):
        _cpu_threads(cfg, cfg.talker)
        loaded = load_model(model, device=cfg.device, dtype=_dtype(cfg))
        ec = EngineConfig(max_num_seqs=cfg.talker.max_num_seqs, batch_wait_s=cfg.talker.batch_wait_s)
        # keeps the talker, the voices and the thinker's embedding table; the rest of the model is dropped
        self.talker = Talker.from_model(loaded.model, ec, emit_every=cfg.talker_emit_every)
        del loaded
        self.thinker = thinker

    async def generate(self, request_id: str, prompt: PreparedPrompt, media: MediaEmbeddings, sampling, voice: str,
                       talker_sampling) -> AsyncIterator:
        self.talker.check_voice(voice)
        up = self.thinker.options(stream=True).generate.remote(request_id, prompt, media, sampling, True)
        try:
            async for item in talker_stream(self.talker, up, request_id, voice, talker_sampling):
                yield item
        finally:
            up.cancel()

    def stats(self) -> dict:
        return self.talker.engine.stats()


class VocoderDeployment:
    def __init__(self, model: str, cfg: ServeConfig, talker):
        from omni.decoders import Token2Wav, VocoderConfig

        _cpu_threads(cfg, cfg.vocoder_deployment)
        vc = VocoderConfig(**{**cfg.vocoder, "device": cfg.device})
        self.loop = VocoderLoop(Token2Wav.from_pretrained(model, vc))
        self.talker = talker

    async def generate(self, request_id: str, prompt: PreparedPrompt, media: MediaEmbeddings, sampling, voice: str,
                       talker_sampling, seed: int) -> AsyncIterator:
        self.loop.vocoder.check_voice(voice)
        up = self.talker.options(stream=True).generate.remote(request_id, prompt, media, sampling, voice,
                                                              talker_sampling)
        try:
            async for item in vocoder_stream(self.loop, up, voice, seed, max_codes=talker_sampling.max_tokens):
                yield item
        finally:
            up.cancel()

    def stats(self) -> dict:
        return {"calls": self.loop.num_calls, "max_batch": self.loop.max_batch}


class RayBackend:
    """The HTTP layer's Backend over DeploymentHandles (runs in the ingress replica)."""

    def __init__(self, model: str, cfg: ServeConfig, vision, audio, thinker, vocoder, voices: list[str]):
        from transformers import AutoProcessor

        self.model_name, self.cfg = model, cfg
        self.processor = AutoProcessor.from_pretrained(resolve_model(model))
        self.vision, self.audio, self.thinker, self.vocoder = vision, audio, thinker, vocoder
        self.voices = voices
        self.max_model_len = cfg.max_model_len
        self.metrics = None  # set by the ingress: the app's Metrics (encoder batch sizes)

    def validate(self, request: ChatRequest) -> None:
        check_request(request, self.voices, self.max_model_len)

    async def _encode(self, prompt: PreparedPrompt) -> MediaEmbeddings:
        calls = ([("vision", self.vision.encode.remote(it)) for it in prompt.images + prompt.videos] +
                 [("audio", self.audio.encode.remote(it)) for it in prompt.audios])
        results = await asyncio.gather(*(c for _, c in calls))
        for (kind, _), (_, size) in zip(calls, results):
            if self.metrics is not None:
                self.metrics.observe_encoder_batch(kind, size)
        embeds = [e for e, _ in results]
        n_img, n_vid = len(prompt.images), len(prompt.videos)
        return MediaEmbeddings(images=embeds[:n_img], videos=embeds[n_img:n_img + n_vid],
                               audios=embeds[n_img + n_vid:])

    async def stream(self, request: ChatRequest) -> AsyncIterator:
        self.validate(request)
        t0 = time.perf_counter()
        prompt = await prepare_checked(self.processor, request, self.max_model_len)
        n = int(prompt.input_ids.shape[0])
        t1 = time.perf_counter()
        media = await self._encode(prompt)
        stages = {"prepare": t1 - t0, "encode": time.perf_counter() - t1}
        if request.speak:
            gen = self.vocoder.options(stream=True).generate.remote(
                request.request_id, prompt, media, request.sampling, request.voice, request.talker_sampling,
                vocoder_seed(request))
        else:
            gen = self.thinker.options(stream=True).generate.remote(request.request_id, prompt, media,
                                                                    request.sampling, False)
        try:
            async for event in finish(gen, prompt_tokens=n, stage_seconds=stages):
                yield event
        finally:
            gen.cancel()


@serve.ingress()
class Ingress:
    """FastAPI ingress (serve/http.py's app), built in the replica after the constructor."""

    def __init__(self, model: str, cfg: ServeConfig, settings, vision, audio, thinker, vocoder,
                 voices: list[str]):
        self.settings = settings
        self.backend = RayBackend(model, cfg, vision, audio, thinker, vocoder, voices)

    def __serve_build_asgi_app__(self):
        from omni.serve.api.server import build_fastapi

        app = build_fastapi(self.backend, self.settings)
        self.backend.metrics = app.state.metrics
        return app
