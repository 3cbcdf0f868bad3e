"""The Serve application: `build_app(args) -> Application` (also `serve run omni.serve.app:build_app model=tiny`)
and `run_server` behind `omni serve`.

Topology (typed Python, here); resources and limits (YAML, configs/serve/, omni.serve.config.ServeConfig):
    Ingress (FastAPI, OpenAI API) -> VisionEncoder, AudioEncoder (@serve.batch)
                                  -> Vocoder -> Talker -> Thinker   (SPEECH_CHAIN as streaming handle calls)
                                  -> Thinker                         (text only)
With `colocate`, adjacent generating stages are one deployment (ThinkerTalkerVocoder, TalkerVocoder, ThinkerTalker).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application

from omni.checkpoint import generation_defaults, list_voices, resolve_model
from omni.serve.cluster.deployments import (
    DRAIN_FLAG,
    DRAIN_POLL_S,
    AudioEncoderDeployment,
    DrainFlag,
    GenerationDeployment,
    Ingress,
    VisionEncoderDeployment,
    group_name,
    group_options,
)
from omni.serve.config import ServeConfig, config_error, load_serve_config

__all__ = ["AppArgs", "build_app", "run_server", "server_settings", "DEPLOYMENT_NAMES", "stage_deployments"]

# deployment name -> the ServeConfig.deployments field that holds its resources (colocate: none)
DEPLOYMENT_NAMES = {
    "Ingress": "ingress",
    "VisionEncoder": "vision_encoder",
    "AudioEncoder": "audio_encoder",
    "Thinker": "thinker",
    "Talker": "talker",
    "Vocoder": "vocoder",
}


class AppArgs(BaseModel):
    """`build_app`'s arguments (strings from `serve run ... key=value`, or the CLI's); an unknown one is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: Optional[str] = None  # preset, directory or hub id; None: the config's
    config: Optional[str] = None  # a configs/serve name or a YAML path; None: the defaults
    served_model_name: Optional[str] = None  # the name /v1/models lists and requests must use
    api_key: Optional[str] = None  # Bearer key on every route but /health
    allowed_local_media_path: Optional[str] = None  # local paths / file:// media only under this directory
    allow_http_media: bool = False  # fetch http(s) media URLs (never from loopback, private or link-local targets)
    api_dialect: Literal["openai", "vllm-omni"] = "openai"  # response shapes


def server_settings(cfg: ServeConfig, args: AppArgs, model: str):
    from omni.encoders.media import MediaPolicy
    from omni.serve.api.server import ServerSettings

    return ServerSettings(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        api_dialect=args.api_dialect,
        max_body_bytes=cfg.max_body_bytes,
        max_tokens=cfg.max_tokens,
        max_concurrent_requests=cfg.max_concurrent_requests,
        max_speech_streams=cfg.max_speech_streams,
        speech_wait_s=cfg.speech_wait_s,
        default_max_tokens=cfg.default_max_tokens,
        default_sampling=generation_defaults(model),
        default_speech_tokens=cfg.default_speech_tokens,
        media_limits=cfg.media,
        media_cache_bytes=cfg.media_cache_bytes,
        realtime=cfg.realtime,
        media_policy=MediaPolicy(
            allowed_local_media_path=args.allowed_local_media_path, allow_http=args.allow_http_media
        ),
    )


def _deployment(cls, cfg: ServeConfig, name: str):
    opts = getattr(cfg.deployments, DEPLOYMENT_NAMES[name])
    return serve.deployment(cls, name=name).options(**opts.serve_options())


def stage_deployments(cfg: ServeConfig, voices: bool = True) -> dict[str, str]:
    """Generating stage -> the name of the deployment hosting it (voices: the model has speech output)."""
    groups = cfg.generation_groups if voices else [("thinker",)]
    return {stage: group_name(group) for group in groups for stage in group}


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
    voices = list_voices(model)
    thinker = speech = None
    # each group pulls from the one before it; without speech output, the Thinker alone
    for group in cfg.generation_groups if voices else [("thinker",)]:
        opts = group_options(cfg, group)
        speech = (
            serve.deployment(GenerationDeployment, name=group_name(group))
            .options(**opts.serve_options())
            .bind(model, cfg, group, opts, speech)
        )
        thinker = thinker or speech
    return _deployment(Ingress, cfg, "Ingress").bind(
        model, cfg, server_settings(cfg, a, model), vision, audio, thinker, speech, voices
    )


def _drain(flag, timeout_s: float) -> tuple[int, float]:
    """Every ingress replica refuses new requests (503) from its next poll on; wait until none has a request in
    flight or `timeout_s` passed. -> (requests still in flight at the end, seconds waited)."""
    import ray

    t0 = time.monotonic()
    ray.get(flag.set.remote())
    time.sleep(2 * DRAIN_POLL_S)  # every replica has seen the flag and reported since
    left = ray.get(flag.in_flight.remote())
    while left and time.monotonic() - t0 < timeout_s:
        time.sleep(DRAIN_POLL_S)
        left = ray.get(flag.in_flight.remote())
    return left, time.monotonic() - t0


def run_server(args) -> int:
    """`omni serve`: Ray (local, or the cluster in RAY_ADDRESS), the Serve app on host:port; blocks until SIGTERM or
    SIGINT, then drains (new requests get 503, in-flight ones finish up to the drain timeout), shuts Serve and Ray
    down and returns 0."""
    import ray

    cfg_path = args.config or "tiny"
    app = build_app(
        {
            "model": args.model,
            "config": cfg_path,
            "served_model_name": args.served_model_name,
            "api_key": args.api_key,
            "allowed_local_media_path": args.allowed_local_media_path,
            "allow_http_media": bool(getattr(args, "allow_http_media", False)),
            "api_dialect": getattr(args, "api_dialect", None) or "openai",
        }
    )
    drain_timeout = (
        args.drain_timeout
        if getattr(args, "drain_timeout", None) is not None
        else load_serve_config(cfg_path).drain_timeout_s
    )
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local": a new Ray of its own; without it ray.init joins the latest cluster started on this machine
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    # after ray.init, which installs its own SIGTERM handler (sys.exit): ours drains first
    stop, got = threading.Event(), []

    def on_signal(signum, frame):
        got.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    flag = DrainFlag.options(name=DRAIN_FLAG, namespace="serve").remote()
    serve.start(http_options={"host": args.host, "port": args.port})
    t0 = time.time()
    print(f"starting the omni Serve app ({args.model}, config {cfg_path}) ...", file=sys.stderr, flush=True)
    serve.run(app, name="omni", route_prefix="/")
    # before the ready line: tools that start `omni serve` (omni bench load, the tests) connect to this Ray to find
    # the replicas (`ray.init(address=...)`; "auto" is ambiguous when other Ray instances run on the machine)
    print(f"ray address: {ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
    print(
        f"ready in {time.time() - t0:.1f}s: http://{args.host}:{args.port}/v1 (OpenAI-compatible); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    left, waited = _drain(flag, drain_timeout)
    serve.shutdown()
    ray.shutdown()
    cut = f", {left} cut at the {drain_timeout:g} s drain timeout" if left else ""
    print(f"omni serve: {got[0]} received: drained in {waited:.1f}s{cut}; stopped", file=sys.stderr, flush=True)
    return 0
