"""The Ray Serve deployments: plain classes hosting the pipeline's stages, and `HandleStages`, the composition's
`Stages` over their DeploymentHandles (the same recipe as in process: serve/compose.py).

A generation deployment hosts one generating stage or several adjacent ones (ServeConfig.colocate), the hand-offs
between those in process (serve/stages.py's StageGroup, as in the in-process pipeline). Where the stages are apart,
speech requests flow as a pull chain of streaming handle calls, so no stage needs sticky routing:
    Ingress --stream--> Vocoder.generate --stream--> Talker.generate --stream--> Thinker.generate     (colocate: none)
    Ingress --stream--> ThinkerTalkerVocoder.generate                               (colocate: thinker+talker+vocoder)
Each stream crosses a process in lists of the items ready at once (several steps and requests per message), and the
ingress reads one stream, the last deployment's. Text-only requests call the Thinker's deployment directly. The
generating stages get the prompt's layout (ids, grids, lengths) and the encoders' embeddings, put into the object
store once by the ingress (`MediaRef`), never the pixels or features. Encoders are called once per media item;
`@serve.batch` merges items of concurrent requests into one forward. Cancelling a stream (client gone) cancels the
upstream call, which frees the request's slot in every engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Optional

import ray
import torch
from ray import serve

from omni.checkpoint import resolve_model
from omni.types import ChatRequest, Generation, MediaEmbeddings, PreparedPrompt, PromptLayout, StageUnavailable
from omni.serve.compose import Composition, prepare_checked
from omni.serve.config import DeploymentOptions, ServeConfig
from omni.serve.encoder_cache import EncoderCache
from omni.serve.models import load_talker, load_thinker, load_vocoder
from omni.serve.stages import StageGroup, TalkerStage, ThinkerStage, VocoderStage, batches

__all__ = [
    "VisionEncoderDeployment",
    "AudioEncoderDeployment",
    "GenerationDeployment",
    "MediaRef",
    "group_options",
    "group_name",
    "HandleStages",
    "Ingress",
    "Encoded",
    "DrainFlag",
    "DRAIN_FLAG",
]

log = logging.getLogger("omni.serve")


# glibc's malloc serves a freed block's size from its heap from then on (its mmap threshold follows the largest block
# freed, up to 32 MiB), and a heap fragmented by tensors of ever-changing shapes (the vocoder's batches of windows)
# keeps its pages: the vocoder's RSS grew ~25 % in a minute of load. So the replica fixes both thresholds and gives
# freed pages back itself, by malloc_trim every few seconds:
# - M_MMAP_THRESHOLD at 32 MiB (glibc's own ceiling): blocks past it are mapped on their own and unmapped when freed.
#   A lower one costs every block past it an mmap and its page faults on each allocation: at 4 MiB the vocoder's
#   thread took ~50,000 minor faults per step at c=8 and its steps 0.87 s instead of 0.70 s; at 1 MiB they took 1.6x.
# - M_TRIM_THRESHOLD out of reach: fixing the mmap threshold also stops glibc's dynamic trim threshold, which then
#   falls back to 128 KiB, and every free() that leaves that much at a heap's top hands the pages back, to fault them
#   in again at the next step: with the 4 MiB threshold alone the whole pipeline ran 1.4x slower at c=8.
# `MALLOC_MMAP_THRESHOLD_=... MALLOC_TRIM_THRESHOLD_=... omni bench --via pipeline ...` measures a setting in process
# (BENCHMARKS.md §10): requests/s at c=8 1.10-1.16 with these two, 0.99-1.03 with glibc's defaults, 0.96-1.01 at
# 4 MiB, 0.73 at 4 MiB with the default trim threshold. The replica's RSS stays flat under load (`omni bench load
# --model tiny --duration 60`: +5.1 %, PASS).
_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES = -1, 1 << 30
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 32 << 20
TRIM_EVERY_S = 5.0


def _give_back_freed_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return

    def trim_now_and_then():
        while True:
            time.sleep(TRIM_EVERY_S)
            trim(0)  # ctypes lets go of the GIL: the replica runs on meanwhile

    threading.Thread(target=trim_now_and_then, name="malloc-trim", daemon=True).start()


def _replica_process(cfg: ServeConfig, opts: DeploymentOptions) -> None:
    """A stage replica's process settings: torch threads on CPU, and freed memory that goes back to the OS."""
    _give_back_freed_memory()
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
        _replica_process(cfg, opts)
        enc = dataclasses.replace(cfg.encoder, device=cfg.device, dtype=cfg.torch_dtype)
        self.encoder = cls.from_pretrained(model, enc)
        self.encode.set_max_batch_size(opts.max_batch_size)
        self.encode.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, items: list) -> list[Encoded]:
        """One item per call from the caller's side; a list here."""
        pairs = await asyncio.to_thread(
            self.encoder.encode_with_deepstack, items
        )  # (embeds, Qwen3's deepstack or None)
        return [Encoded(e, len(items), d) for e, d in pairs]


class VisionEncoderDeployment(_EncoderDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        from omni.encoders import VisionEncoder

        self._setup(VisionEncoder, model, cfg, cfg.deployments.vision_encoder)


class AudioEncoderDeployment(_EncoderDeployment):
    def __init__(self, model: str, cfg: ServeConfig):
        from omni.encoders import AudioEncoder

        self._setup(AudioEncoder, model, cfg, cfg.deployments.audio_encoder)


@dataclasses.dataclass(frozen=True)
class MediaRef:
    """A request's MediaEmbeddings in the object store (put once by the ingress): the chain's stages before the
    Thinker pass this ref on, only the replica hosting the Thinker reads the embeddings."""

    ref: ray.ObjectRef


async def _media(media) -> MediaEmbeddings:
    return await media.ref if isinstance(media, MediaRef) else media


async def _flatten(batches: AsyncIterator[list]) -> AsyncIterator:
    async for batch in batches:
        for item in batch:
            yield item


class GenerationDeployment:
    """Adjacent generating stages in one replica (serve/stages.py's StageGroup; ServeConfig.colocate), the hand-offs
    between them in process: ("thinker",), ("talker", "vocoder"), ("thinker", "talker", "vocoder"), ... A group without
    the Thinker pulls its input from the deployment before it (`upstream`). Its stream crosses to the next process in
    lists (`batches`: every item ready at once in one message)."""

    def __init__(self, model: str, cfg: ServeConfig, stages: tuple[str, ...], opts: DeploymentOptions, upstream=None):
        from omni.decoders import VocoderLoop

        _replica_process(cfg, opts)
        root, chain = None, {}
        for name in stages:  # each stage's weights only, of the checkpoint's architecture (serve/models.py)
            if name == "thinker":
                root = ThinkerStage(load_thinker(model, cfg.thinker, cfg.max_model_len, cfg.device, cfg.torch_dtype))
            elif name == "talker":  # the talker's weights, the voices and the rows of the thinker's embedding it reads
                chain[name] = TalkerStage(load_talker(model, cfg, cfg.device, cfg.torch_dtype))
            else:
                chain[name] = VocoderStage(VocoderLoop(load_vocoder(model, cfg, cfg.device, cfg.torch_dtype)))
        self.group, self.upstream = StageGroup(root, chain), upstream

    async def generate(self, gen: Generation, prompt: PromptLayout, media) -> AsyncIterator[list]:
        """Lists of stream items (TextDelta, hand-offs, done-markers, AudioChunk), in order. media: MediaEmbeddings or
        a MediaRef to them."""
        up = None
        if self.group.root is not None:
            items = self.group.run(gen, prompt=prompt, media=await _media(media))
        else:
            up = self.upstream.options(stream=True).generate.remote(gen, prompt, media)
            items = self.group.run(gen, upstream=_flatten(up))
        try:
            async for batch in batches(items):
                yield batch
        finally:
            if up is not None:
                up.cancel()

    def stats(self, stage: Optional[str] = None) -> dict:
        """A stage's counters (running rows / open streams; default: the group's first stage) and this replica's
        resident memory."""
        import psutil

        stats = self.group.stats()
        return {**stats[stage or self.group.names[0]], "rss_mb": psutil.Process().memory_info().rss / 2**20}

    async def chain_stats(self) -> dict[str, dict]:
        """The stats of this group's stages and of every stage upstream of it, by stage name (one replica each)."""
        out = {name: self.stats(name) for name in self.group.names}
        if self.upstream is not None:
            out.update(await self.upstream.chain_stats.remote())
        return out


def group_options(cfg: ServeConfig, stages: tuple[str, ...]) -> DeploymentOptions:
    """A group's deployment options: its first stage's, with the CPUs, GPUs and custom resources of all its stages."""
    each = [getattr(cfg.deployments, name) for name in stages]
    resources: dict[str, float] = {}
    for o in each:
        for k, v in o.resources.items():
            resources[k] = resources.get(k, 0.0) + v
    return each[0].model_copy(
        update={
            "num_cpus": sum(o.num_cpus for o in each),
            "num_gpus": sum(o.num_gpus for o in each),
            "resources": resources,
        }
    )


def group_name(stages: tuple[str, ...]) -> str:
    """The deployment name of a group of stages: Thinker, Talker, Vocoder, ThinkerTalkerVocoder, TalkerVocoder, ..."""
    return "".join(name.capitalize() for name in stages)


# what a handle call raises when the replica serving it died or none is up: Ray's actor errors (ActorDiedError,
# ActorUnavailableError; wrapped in a RayTaskError when a stage further up the chain saw them) and Serve's
_REPLICA_FAILURES = (
    ray.exceptions.RayActorError,
    serve.exceptions.ReplicaUnavailableError,
    serve.exceptions.DeploymentUnavailableError,
    serve.exceptions.BackPressureError,
)


def _replica_failure(exc: BaseException) -> Optional[BaseException]:
    """The replica failure inside `exc` (Ray keeps a replica's exception as `.cause`), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _REPLICA_FAILURES):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _raise_unavailable(exc: BaseException) -> None:
    """Raise StageUnavailable (the client gets a 503 and retries) when `exc` is a replica failure; else return."""
    if isinstance(exc, StageUnavailable):
        return
    failure = _replica_failure(exc)
    if failure is not None:
        raise StageUnavailable("a serving replica failed or is restarting; retry later") from failure


async def _within(awaitable, seconds: float, what: str):
    """`await awaitable`, or StageUnavailable after `seconds` (ServeConfig.stage_timeout_s): a call to a replica that
    died waits in Serve's queue until a new replica is up, for ever if none can start."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            return await awaitable
    except TimeoutError:
        if timeout.expired():
            raise StageUnavailable(f"{what} within {seconds:g} s; retry later") from None
        raise


class HandleStages:
    """serve/compose.py's `Stages` over DeploymentHandles (runs in the ingress replica)."""

    def __init__(
        self,
        model: str,
        cfg: ServeConfig,
        vision,
        audio,
        thinker,
        speech,
        voices: list[str],
        observe_batch: Optional[Callable[[str, int], None]] = None,
    ):
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
        calls = [*images, *videos, *audios]
        try:
            results = await _within(asyncio.gather(*calls), self.cfg.stage_timeout_s, "no encoder answered")
        except Exception as exc:
            for call in calls:
                call.cancel()
            _raise_unavailable(exc)
            raise
        n_img, n_vid = len(images), len(videos)
        if self.observe_batch is not None:
            for i, r in enumerate(results):
                self.observe_batch("vision" if i < n_img + n_vid else "audio", r.batch_size)
        pairs = [(r.embeds, r.deepstack) for r in results]  # deepstack: Qwen3's vision features, else None
        return MediaEmbeddings.assemble(
            pairs[:n_img], pairs[n_img : n_img + n_vid], [e for e, _ in pairs[n_img + n_vid :]]
        )

    async def generate(self, gen: Generation, prompt: PromptLayout, media: MediaEmbeddings) -> AsyncIterator:
        head = self.speech if gen.speak else self.thinker
        if media.images or media.videos or media.audios:  # into the object store once; the Thinker's replica reads it
            media = MediaRef(ray.put(media))
        items = head.options(stream=True).generate.remote(gen, prompt, media)
        try:
            while True:
                try:
                    batch = await _within(items.__anext__(), self.cfg.stage_timeout_s, "no output")
                except StopAsyncIteration:
                    return
                for item in batch:
                    yield item
        except Exception as exc:
            _raise_unavailable(exc)
            raise
        finally:
            items.cancel()


DRAIN_FLAG = "omni-drain"  # named actor (namespace "serve") through which `omni serve` drains every ingress replica
STAGE_STATS_S = 2.0  # how often an ingress replica reads the stages' stats for /metrics
DRAIN_POLL_S = 0.25  # how often an ingress replica reads the flag and reports its requests in flight


@ray.remote(num_cpus=0)
class DrainFlag:
    """Set once by `omni serve` on SIGTERM/SIGINT; every ingress replica polls it and reports what it still serves."""

    def __init__(self):
        self.draining, self.reports = False, {}

    def set(self) -> None:
        self.draining = True

    def poll(self, replica: str, in_flight: int) -> bool:
        self.reports[replica] = (in_flight, time.monotonic())
        return self.draining

    def in_flight(self, fresh_s: float = 2.0) -> int:
        """Requests in flight over the replicas that reported within `fresh_s`."""
        now = time.monotonic()
        return sum(n for n, t in self.reports.values() if now - t <= fresh_s)


@serve.ingress()
class Ingress:
    """FastAPI ingress (serve/api/server.py's app over the composition), built in the replica after the constructor."""

    async def __init__(self, model: str, cfg: ServeConfig, settings, vision, audio, thinker, speech, voices: list[str]):
        from omni.serve.api.metrics import Metrics

        self.settings, self.metrics = settings, Metrics()
        stages = HandleStages(model, cfg, vision, audio, thinker, speech, voices, self.metrics.observe_encoder_batch)
        self.backend = Composition(stages, EncoderCache(cfg.encoder_cache_bytes))  # hits: no encoder call
        self.routes = None
        self._watch = asyncio.get_running_loop().create_task(self._watch_drain())
        self._stage_stats: dict[str, dict] = {}  # the chain's stage stats, refreshed by _watch_stages
        self.metrics.watch_stages(lambda: self._stage_stats)
        self._watch_stats = asyncio.get_running_loop().create_task(self._watch_stages(speech))

    def __serve_build_asgi_app__(self):
        from omni.serve.api.server import build_fastapi

        app = build_fastapi(self.backend, self.settings, self.metrics)
        self.routes = app.state.routes
        return app

    async def _watch_stages(self, tail) -> None:
        """Every STAGE_STATS_S, the generating stages' stats through the chain's last stage (for /metrics; one
        replica per stage answers)."""
        while True:
            await asyncio.sleep(STAGE_STATS_S)
            try:
                self._stage_stats = await tail.chain_stats.remote()
            except Exception:  # noqa: BLE001 - a stage restarting: keep the last numbers
                log.debug("stage stats unreachable", exc_info=True)

    async def _watch_drain(self) -> None:
        """Poll the drain flag (when `omni serve` made one): once set, this replica refuses new requests (503)."""
        replica = serve.get_replica_context().replica_id.unique_id
        flag = None
        while True:
            await asyncio.sleep(DRAIN_POLL_S)
            try:
                flag = flag or ray.get_actor(DRAIN_FLAG, namespace="serve")
                active = self.routes.admission.active if self.routes is not None else 0
                if await flag.poll.remote(replica, active) and self.routes is not None:
                    self.routes.drain()
            except ValueError:  # no flag: started by `serve run`, which drains with Serve's own shutdown
                flag = None
            except Exception:  # noqa: BLE001 - the flag's owner is gone (shutting down): keep serving what runs
                log.debug("drain flag unreachable", exc_info=True)
