"""The one typed config tree. The stage settings are the stages' own frozen dataclasses (each default written once,
beside the code it configures, range-checked in its `__post_init__`); this module composes them:

    PipelineConfig   the stages, in process or on Ray: context, Thinker and Talker engines, the Talker hand-off,
                     the vocoder schedule (Qwen2.5's token2wav: `vocoder`; Qwen3's Code2Wav: `code2wav`), encoder
                     batching; the checkpoint's architecture picks the implementations, one section each
    ServeConfig      a PipelineConfig plus the model, the HTTP limits, media limits and the Ray Serve resources per
                     deployment; loaded from YAML (configs/serve/*.yaml, package data)

Unknown keys are refused at load with their path (`vocoder.first_chunk_codez: unknown field`), values are type- and
range-checked; the topology is typed Python in serve/cluster/builder.py.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omni.checkpoint import default_dtype
from omni.engine import EngineConfig
from omni.talker import TalkerConfig
from omni.decoders.code2wav import Code2WavConfig
from omni.decoders.token2wav import VocoderConfig
from omni.encoders.media import MediaLimits
from omni.encoders.vision import EncoderConfig
from omni.serve.api.realtime_events import RealtimeLimits
from omni.serve.compose import SPEECH_CHAIN

__all__ = [
    "PipelineConfig",
    "ServeConfig",
    "DeploymentOptions",
    "EncoderDeploymentOptions",
    "Deployments",
    "ConfigError",
    "load_serve_config",
    "config_error",
    "field_path",
    "CONFIG_DIR",
]

CONFIG_DIR = Path(str(files("omni.configs") / "serve"))  # package data: the checkout's configs/serve, or the wheel's


class ConfigError(ValueError):
    """A config (YAML or builder arguments) that does not fit the schema; the message names each bad key's path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineConfig(_Strict):
    max_model_len: int = Field(32768, ge=1)  # prompt + max_tokens at most
    thinker: EngineConfig = EngineConfig()  # the Thinker's running batch (max_num_seqs, batch_wait_s)
    talker: TalkerConfig = TalkerConfig()  # the Talker's running batch and its hand-off to the vocoder (emit_every)
    vocoder: VocoderConfig = VocoderConfig()  # Qwen2.5 token2wav: chunk schedule and context (device: top-level)
    code2wav: Code2WavConfig = Code2WavConfig()  # Qwen3 Code2Wav: first and later chunk frames (device: top-level)
    encoder: EncoderConfig = EncoderConfig()  # items and tokens per tower forward (device/dtype: the top-level ones)
    encoder_cache_bytes: int = Field(256 * 2**20, ge=0)  # encoder outputs kept by content hash in the composition's
    #   process (LRU), so resent media is not encoded again (serve/encoder_cache.py); 0: off. 256 MiB holds ~20 images
    #   of 1280 tokens for a 7B (3584 floats per token: 14 KiB)
    cpu_threads: Optional[int] = Field(None, ge=1)  # torch threads on CPU; None: in process cores // 3 (three stages
    #                                                 run at once), on Ray each replica's num_cpus


class DeploymentOptions(_Strict):
    num_replicas: int = Field(1, ge=1)  # fixed replica count (ignored when autoscaling_config is set)
    autoscaling_config: Optional[dict[str, Any]] = None  # Ray Serve autoscaling (min/max_replicas, targets)
    num_cpus: float = Field(0.2, ge=0)  # CPUs reserved per replica (fractions on small machines, or serve.run waits)
    num_gpus: float = Field(0.0, ge=0)  # GPUs per replica (fractions share one GPU between stages)
    max_ongoing_requests: int = Field(64, ge=1)  # requests a replica takes at once before Serve queues them
    resources: dict[str, float] = Field(default_factory=dict)  # Ray custom resources per replica (node placement)

    def serve_options(self) -> dict:
        """The options of `Deployment.options(...)`."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        opts: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests, "ray_actor_options": actor}
        if self.autoscaling_config:
            opts["autoscaling_config"] = self.autoscaling_config
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class EncoderDeploymentOptions(DeploymentOptions):
    max_batch_size: int = Field(8, ge=1)  # items of concurrent requests per @serve.batch call
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=1)  # how long a batch waits to fill


class Deployments(_Strict):
    ingress: DeploymentOptions = DeploymentOptions(num_cpus=0.1)  # FastAPI, prompt building, media decoding
    vision_encoder: EncoderDeploymentOptions = EncoderDeploymentOptions()
    audio_encoder: EncoderDeploymentOptions = EncoderDeploymentOptions()
    thinker: DeploymentOptions = DeploymentOptions()
    talker: DeploymentOptions = DeploymentOptions()
    vocoder: DeploymentOptions = DeploymentOptions()


class ServeConfig(PipelineConfig):
    model: str = "tiny"  # preset, checkpoint directory or hub id (the CLI's --model wins)
    device: str = "cpu"  # "cuda" on GPU nodes: every stage's weights go there
    dtype: Optional[str] = None  # None: float32 on CPU, bfloat16 on CUDA
    max_tokens: Optional[int] = Field(4096, ge=1)  # per-request max_tokens limit (400 past it); None: max_model_len
    max_concurrent_requests: int = Field(64, ge=1)  # chat completions in flight per ingress replica; 503 past it
    max_speech_streams: Optional[int] = Field(None, ge=1)  # speech streams (chat completions with audio and
    #   /v1/audio/speech) in flight per ingress replica; more wait their turn up to speech_wait_s, then 503 (None: no
    #   limit; BENCHMARKS.md: how many the stages keep in real time)
    speech_wait_s: float = Field(30.0, ge=0)  # seconds a speech request waits for its slot before its 503
    default_max_tokens: int = Field(256, ge=1)  # text tokens when a request does not say
    default_speech_tokens: int = Field(2048, ge=1)  # codec tokens (50 per second of speech) when a request does not say
    max_body_bytes: int = Field(100 * 2**20, ge=1)  # request bodies past this get 413
    drain_timeout_s: float = Field(30.0, ge=0, le=3600)  # on SIGTERM/SIGINT: how long in-flight requests may finish
    stage_timeout_s: float = Field(60.0, gt=0, le=3600)  # longest wait for a stage's next answer (embeddings, the next
    #                             streamed item) before the request fails with 503: bounds a request whose replica died
    #                             and that would otherwise wait in Serve's queue until a new one is up (or for ever)
    media_cache_bytes: int = Field(128 * 2**20, ge=0)  # decoded inline media (data: URIs, base64 audio) kept by content
    #   hash where requests are converted (the ingress), LRU, so a conversation's resent media is not decoded again
    #   (serve/api/media_cache.py); 0: off. 128 MiB holds ~40 images of 1280x1024 or ~10 short videos
    media: MediaLimits = MediaLimits()  # per media item: bytes, pixels, seconds, frames, sampling
    realtime: RealtimeLimits = RealtimeLimits()  # /v1/realtime: session length, buffered audio, events/s, event size
    deployments: Deployments = Deployments()  # Ray Serve resources per deployment
    colocate: Literal["none", "thinker+talker", "talker+vocoder", "thinker+talker+vocoder"] = "none"  # adjacent
    #   generating stages that run in one replica, the hand-offs between them in process (one deployment named by
    #   its stages, e.g. ThinkerTalkerVocoder, with the first stage's deployment options and the group's CPUs, GPUs
    #   and custom resources summed); "none": one deployment per stage. The encoders are always their own.

    @property
    def generation_groups(self) -> list[tuple[str, ...]]:
        """The generating stages by replica, in the chain's order: [("thinker",), ("talker",), ("vocoder",)] for
        "none", [("thinker",), ("talker", "vocoder")] for "talker+vocoder", ..."""
        together = tuple(self.colocate.split("+")) if self.colocate != "none" else ()
        groups: list[tuple[str, ...]] = []
        for stage in ("thinker", *SPEECH_CHAIN):
            if groups and stage in together and groups[-1][-1] in together:
                groups[-1] += (stage,)
            else:
                groups.append((stage,))
        return groups

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {v!r}")
        return v

    @property
    def torch_dtype(self) -> str:
        return self.dtype or default_dtype(self.device)


def field_path(loc) -> str:
    """pydantic's ('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def config_error(exc: ValidationError, what: str) -> ConfigError:
    """pydantic's errors -> one ConfigError naming each bad key by its path."""
    lines = []
    for err in exc.errors():
        kind = err.get("type", "")
        msg = (
            "unknown field"
            if kind in ("extra_forbidden", "unexpected_keyword_argument")
            else str(err.get("msg", "")).removeprefix("Value error, ")
        )
        lines.append(f"{field_path(err.get('loc', ()))}: {msg}")
    return ConfigError(f"{what}: " + "; ".join(lines))


def load_serve_config(path: Optional[str] = None) -> ServeConfig:
    """A YAML path, a name under configs/serve/ ("tiny"), or None for the defaults. Raises FileNotFoundError for a
    name that is neither, ConfigError for content that does not fit."""
    if path is None:
        return ServeConfig()
    p = Path(path)
    if not p.exists():
        p = CONFIG_DIR / (path if path.endswith((".yaml", ".yml")) else f"{path}.yaml")
    if not p.exists():
        names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no serve config {path!r} (a YAML path, or one of {names})")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a serve config is a YAML mapping, got {type(data).__name__}")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, str(p)) from None
