"""Serve configuration: resources and limits from YAML (configs/serve/*.yaml); the topology is typed Python in
serve/app.py. Every field has a default, so a YAML file names only what it changes."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DeploymentOptions", "ServeConfig", "load_serve_config", "CONFIG_DIR"]

CONFIG_DIR = Path(str(files("omni.configs") / "serve"))  # package data: the checkout's configs/serve, or the wheel's


class DeploymentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_replicas: Optional[int] = 1  # fixed replica count (ignored when autoscaling_config is set)
    autoscaling_config: Optional[dict[str, Any]] = None  # Ray Serve autoscaling (min/max_replicas, targets)
    num_cpus: float = 0.2  # CPUs reserved per replica (fractional on small machines, or serve.run waits forever)
    num_gpus: float = 0.0  # GPUs per replica (fractions share one GPU between stages)
    max_ongoing_requests: int = 64  # requests a replica takes at once before Serve queues them
    max_batch_size: int = 8  # encoders: items per @serve.batch call
    batch_wait_timeout_s: float = 0.01  # encoders: how long a batch waits to fill
    max_num_seqs: int = 64  # Thinker/Talker: rows of the running batch
    batch_wait_s: float = 0.0  # Thinker/Talker: wait for rows fed by the upstream step before stepping

    def serve_options(self) -> dict:
        """The options of `Deployment.options(...)`."""
        opts: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.autoscaling_config:
            opts["autoscaling_config"] = self.autoscaling_config
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "tiny"  # preset, checkpoint directory or hub id (the CLI's --model wins)
    device: str = "cpu"  # "cuda" on GPU nodes: every stage's weights go there
    dtype: Optional[str] = None  # None: float32 on CPU, bfloat16 on CUDA
    max_model_len: int = 32768  # prompt + max_tokens at most
    max_tokens: Optional[int] = 4096  # per-request max_tokens limit (400 past it)
    max_concurrent_requests: int = 64  # per ingress replica; 503 past it
    default_max_tokens: int = 256  # text tokens when a request does not say
    default_speech_tokens: int = 2048  # codec tokens (50 per second of speech) when a request does not say
    max_body_bytes: int = 100 * 2**20  # 413 past it
    talker_emit_every: int = 4  # codec ids per Talker -> vocoder hand-off
    vocoder: dict[str, Any] = Field(default_factory=dict)  # VocoderConfig fields (chunk schedule, context)
    media: dict[str, Any] = Field(default_factory=dict)  # MediaLimits fields
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.1))
    vision_encoder: DeploymentOptions = Field(default_factory=DeploymentOptions)
    audio_encoder: DeploymentOptions = Field(default_factory=DeploymentOptions)
    thinker: DeploymentOptions = Field(default_factory=DeploymentOptions)
    talker: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(batch_wait_s=0.01))
    vocoder_deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


def load_serve_config(path: Optional[str] = None) -> ServeConfig:
    """A YAML path, a name under configs/serve/ ("tiny"), or None for the defaults."""
    if path is None:
        return ServeConfig()
    p = Path(path)
    if not p.exists():
        p = CONFIG_DIR / (path if path.endswith((".yaml", ".yml")) else f"{path}.yaml")
    if not p.exists():
        names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no serve config {path!r} (a YAML path, or one of {names})")
    data = yaml.safe_load(p.read_text()) or {}
    return ServeConfig(**data)
