"""The Serve application: `build_app(args) -> Application` (also `serve run omni.serve.app:build_app model=tiny`)
and `run_server` behind `omni serve`.

Topology (typed Python, here); resources and limits (YAML, configs/serve/):
    Ingress (FastAPI, OpenAI API) -> VisionEncoder, AudioEncoder (@serve.batch)
                                  -> Vocoder -> Talker -> Thinker   (streaming handle calls, a pull chain)
                                  -> Thinker                         (text only)
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from ray import serve
from ray.serve import Application

from omni.checkpoint import generation_defaults, list_voices, resolve_model
from omni.serve.config import ServeConfig, load_serve_config
from omni.serve.cluster.deployments import (AudioEncoderDeployment, Ingress, TalkerDeployment, ThinkerDeployment,
                                    VisionEncoderDeployment, VocoderDeployment)

__all__ = ["build_app", "run_server", "server_settings"]


def server_settings(cfg: ServeConfig, served_model_name: Optional[str], api_key: Optional[str],
                    allowed_local_media_path: Optional[str], model: Optional[str] = None):
    from omni.encoders.media import MediaLimits, MediaPolicy
    from omni.serve.api.server import ServerSettings

    return ServerSettings(served_model_name=served_model_name, api_key=api_key, max_body_bytes=cfg.max_body_bytes,
                          max_tokens=cfg.max_tokens, max_concurrent_requests=cfg.max_concurrent_requests,
                          default_max_tokens=cfg.default_max_tokens,
                          default_sampling=generation_defaults(model or cfg.model),
                          default_speech_tokens=cfg.default_speech_tokens,
                          media_limits=MediaLimits(**cfg.media),
                          media_policy=MediaPolicy(allowed_local_media_path=allowed_local_media_path),
                          allowed_local_media_path=allowed_local_media_path)


def _deployment(cls, opts, name: str):
    return serve.deployment(cls, name=name).options(**opts.serve_options())


def build_app(args: dict[str, Any]) -> Application:
    """args (strings from `serve run ... key=value`, or the CLI): model, config, served_model_name, api_key,
    allowed_local_media_path."""
    cfg = load_serve_config(args.get("config"))
    model = args.get("model") or cfg.model
    resolve_model(model)  # build the tiny checkpoint once here, not in every replica at the same time
    served = args.get("served_model_name") or None
    settings = server_settings(cfg, served, args.get("api_key") or None, args.get("allowed_local_media_path") or None,
                               model)
    vision = _deployment(VisionEncoderDeployment, cfg.vision_encoder, "VisionEncoder").bind(model, cfg)
    audio = _deployment(AudioEncoderDeployment, cfg.audio_encoder, "AudioEncoder").bind(model, cfg)
    thinker = _deployment(ThinkerDeployment, cfg.thinker, "Thinker").bind(model, cfg)
    talker = _deployment(TalkerDeployment, cfg.talker, "Talker").bind(model, cfg, thinker)
    vocoder = _deployment(VocoderDeployment, cfg.vocoder_deployment, "Vocoder").bind(model, cfg, talker)
    return _deployment(Ingress, cfg.ingress, "Ingress").bind(model, cfg, settings, vision, audio, thinker, vocoder,
                                                             list_voices(model))


def run_server(args) -> int:
    """`omni serve`: Ray (local, or the cluster in RAY_ADDRESS), the Serve app on host:port; blocks until Ctrl-C."""
    import ray

    cfg_path = args.config or "tiny"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local": a new Ray of its own; without it ray.init joins the latest cluster started on this machine
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app({"model": args.model, "config": cfg_path, "served_model_name": args.served_model_name,
                     "api_key": args.api_key, "allowed_local_media_path": args.allowed_local_media_path})
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
