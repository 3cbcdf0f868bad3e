"""Prometheus metrics of one HTTP app (its own CollectorRegistry, so two apps in one process never share counters).

Per request: a `RequestTrack` follows the events and records time to first token / first audio packet; the app
records the end-to-end latency and the status. Hooks for the Ray app: `observe_stage`, `observe_encoder_batch`.
"""
from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from omni.types import AudioChunk, Event, Finished, TextDelta

__all__ = ["Metrics", "RequestTrack", "CONTENT_TYPE_LATEST"]

# seconds: 5 ms .. 2 min, dense below 1 s where TTFT / TTFAP live
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # items per encoder call


class Metrics:
    """The metric families of one app; `render()` is the /metrics body."""

    def __init__(self, registry: Optional[CollectorRegistry] = None, prefix: str = "omni"):
        self.registry, self.prefix = registry or CollectorRegistry(), prefix
        r, p = self.registry, prefix
        self.requests = Counter(f"{p}_requests", "Chat-completion requests by HTTP status", ["status"], registry=r)
        self.stream_errors = Counter(f"{p}_stream_errors", "Streams that failed after their first byte", registry=r)
        self.cancelled = Counter(f"{p}_requests_cancelled", "Requests whose client went away", registry=r)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests admitted and not finished", registry=r)
        self.waiting = Gauge(f"{p}_requests_waiting", "Admitted requests that have no output yet (queue depth)",
                             registry=r)
        self.e2e = Histogram(f"{p}_request_latency_seconds", "End-to-end latency of successful requests",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to first text delta",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfap = Histogram(f"{p}_time_to_first_audio_seconds", "Arrival to first audio chunk (TTFAP)",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.speech_ttfap = Histogram(f"{p}_speech_time_to_first_audio_seconds",
                                      "/v1/audio/speech: arrival to first audio chunk", buckets=_LATENCY_BUCKETS,
                                      registry=r)
        self.speech_requests = Counter(f"{p}_speech_requests", "/v1/audio/speech requests by HTTP status",
                                       ["status"], registry=r)
        self.stage = Histogram(f"{p}_stage_latency_seconds", "Time spent per stage per request", ["stage"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Generated text tokens", registry=r)
        self.audio_seconds = Counter(f"{p}_audio_output_seconds", "Seconds of speech sent", registry=r)
        self.encoder_batch = Histogram(f"{p}_encoder_batch_size", "Items per encoder call", ["kind"],
                                       buckets=_BATCH_BUCKETS, registry=r)

    def track(self, speech: bool = False) -> "RequestTrack":
        """speech: a /v1/audio/speech request (its first audio goes to speech_ttfap)."""
        return RequestTrack(self, self.speech_ttfap if speech else self.ttfap)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage=stage).observe(seconds)

    def observe_encoder_batch(self, kind: str, size: int) -> None:
        """kind: "vision", "audio", ...; size: requests' items in one encoder forward."""
        self.encoder_batch.labels(kind=kind).observe(size)

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTrack:
    """One admitted request: in-flight / waiting gauges, first-token and first-audio times, token counts.
    `close()` must run exactly once (the app calls it in a finally)."""

    def __init__(self, metrics: Metrics, ttfap: Optional[Histogram] = None):
        self.m, self.t0 = metrics, time.perf_counter()
        self.ttfap = ttfap or metrics.ttfap
        self.first_text: Optional[float] = None  # seconds after arrival
        self.first_audio: Optional[float] = None
        self._waiting, self._closed = True, False
        metrics.in_flight.inc()
        metrics.waiting.inc()

    def _started(self) -> None:
        if self._waiting:
            self._waiting = False
            self.m.waiting.dec()

    def on_event(self, ev: Event) -> None:
        now = time.perf_counter() - self.t0
        self._started()
        if isinstance(ev, TextDelta) and self.first_text is None and ev.text:
            self.first_text = now
            self.m.ttft.observe(now)
        elif isinstance(ev, AudioChunk):
            if self.first_audio is None:
                self.first_audio = now
                self.ttfap.observe(now)
            self.m.audio_seconds.inc(len(ev.pcm) / ev.sample_rate)
        elif isinstance(ev, Finished):
            self.m.prompt_tokens.inc(ev.prompt_tokens)
            self.m.completion_tokens.inc(ev.completion_tokens)
            for stage, seconds in (getattr(ev, "stage_seconds", None) or {}).items():
                self.m.observe_stage(stage, seconds)

    def close(self, ok: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._started()
        self.m.in_flight.dec()
        if ok:
            elapsed = time.perf_counter() - self.t0
            self.m.e2e.observe(elapsed)
            self.m.observe_stage("end_to_end", elapsed)
