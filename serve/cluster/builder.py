"""The Serve application: `build_app(args) -> Application` (also `serve run omni.serve.app:build_app model=tiny`)
and `run_server` behind `omni serve`.

Topology (typed Python, here); resources and limits (YAML, configs/serve/, omni.serve.config.ServeConfig):
    Ingress (FastAPI, OpenAI API) -> VisionEncoder, AudioEncoder (@serve.batch)
                                  -> Vocoder -> Talker -> Thinker   (SPEECH_CHAIN as streaming handle calls)
                                  -> Thinker                         (text only)
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application

from omni.checkpoint import generation_defaults, list_voices, resolve_model
from omni.serve.compose import SPEECH_CHAIN
from omni.serve.config import ServeConfig, config_error, load_serve_config
from omni.serve.cluster.deployments import (CHAIN_DEPLOYMENTS, AudioEncoderDeployment, Ingress, ThinkerDeployment,
                                            VisionEncoderDeployment)

__all__ = ["AppArgs", "build_app", "run_server", "server_settings", "DEPLOYMENT_NAMES"]

# deployment name -> the ServeConfig.deployments field that holds its resources
DEPLOYMENT_NAMES = {"Ingress": "ingress", "VisionEncoder": "vision_encoder", "AudioEncoder": "audio_encoder",
                    "Thinker": "thinker", "Talker": "talker", "Vocoder": "vocoder"}


class AppArgs(BaseModel):
    """`build_app`'s arguments (strings from `serve run ... key=value`, or the CLI's); an unknown one is an error."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: Optional[str] = None  # preset, directory or hub id; None: the config's
    config: Optional[str] = None  # a configs/serve name or a YAML path; None: the defaults
    served_model_name: Optional[str] = None  # the name /v1/models lists and requests must use
    api_key: Optional[str] = None  # Bearer key on every route but /health
    allowed_local_media_path: Optional[str] = None  # local paths / file:// media only under this directory


def server_settings(cfg: ServeConfig, args: AppArgs, model: str):
    from omni.encoders.media import MediaPolicy
    from omni.serve.api.server import ServerSettings

    return ServerSettings(served_model_name=args.served_model_name, api_key=args.api_key,
                          max_body_bytes=cfg.max_body_bytes, max_tokens=cfg.max_tokens,
                          max_concurrent_requests=cfg.max_concurrent_requests,
                          default_max_tokens=cfg.default_max_tokens, default_sampling=generation_defaults(model),
                          default_speech_tokens=cfg.default_speech_tokens, media_limits=cfg.media,
                          media_policy=MediaPolicy(allowed_local_media_path=args.allowed_local_media_path))


def _deployment(cls, cfg: ServeConfig, name: str):
    opts = getattr(cfg.deployments, DEPLOYMENT_NAMES[name])
    return serve.deployment(cls, name=name).options(**opts.serve_options())


def build_app(args: dict[str, Any]) -> Application:
    """args: see AppArgs (empty strings count as unset, as `serve run key=` gives them)."""
    try:
        a = AppArgs.model_validate({k: (v if v != "" else None) for k, v in dict(args).items()})
    except ValidationError as exc:
        raise config_error(exc, "build_app arguments") from None
    cfg = load_serve_config(a.config)
    model = a.model or cfg.model
    resolve_model(model)  # build the tiny checkpoint once here, not in every replica at the same time
    vision = _deployment(VisionEncoderDeployment, cfg, "VisionEncoder").bind(model, cfg)
    audio = _deployment(AudioEncoderDeployment, cfg, "AudioEncoder").bind(model, cfg)
    thinker = _deployment(ThinkerDeployment, cfg, "Thinker").bind(model, cfg)
    speech, voices = thinker, list_voices(model)
    for stage in SPEECH_CHAIN if voices else ():  # each stage pulls from the one before it; none without speech output
        speech = _deployment(CHAIN_DEPLOYMENTS[stage], cfg, stage.capitalize()).bind(model, cfg, speech)
    return _deployment(Ingress, cfg, "Ingress").bind(model, cfg, server_settings(cfg, a, model), vision, audio,
                                                     thinker, speech, voices)


def run_server(args) -> int:
    """`omni serve`: Ray (local, or the cluster in RAY_ADDRESS), the Serve app on host:port; blocks until Ctrl-C."""
    import ray

    cfg_path = args.config or "tiny"
    app = build_app({"model": args.model, "config": cfg_path, "served_model_name": args.served_model_name,
                     "api_key": args.api_key, "allowed_local_media_path": args.allowed_local_media_path})
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": args.host, "port": args.port})
    t0 = time.time()
    print(f"starting the omni Serve app ({args.model}, config {cfg_path}) ...", file=sys.stderr, flush=True)
    serve.run(app, name="omni", route_prefix="/")
    print(f"ready in {time.time() - t0:.1f}s: http://{args.host}:{args.port}/v1 (OpenAI-compatible); Ctrl-C stops",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
