"""Prometheus metrics of one HTTP app (its own CollectorRegistry, so two apps in one process never share counters).

Per request: a `RequestTrack` follows the events and records time to first token / first audio packet; the app
records the end-to-end latency and the status. Hooks for the Ray app: `observe_stage`, `observe_encoder_batch`.
Per generating stage, read at each scrape from `watch_stages(source)` (the in-process pipeline's `stage_stats`):
requests running and waiting, queue time and batch size (omni.loop.LoopStats).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from omni.types import AudioChunk, Event, Finished, TextDelta

__all__ = ["Metrics", "RequestTrack", "Playback", "STALL_OK_S", "CONTENT_TYPE_LATEST"]

# seconds: 5 ms .. 2 min, dense below 1 s where TTFT / TTFAP live
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # items per encoder call
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)  # generation s / speech s; < 1 keeps up
STALL_OK_S = 0.05  # a stream plays continuously when no gap in its playback is longer than this (50 ms)


class Playback:
    """A client that plays a stream in real time from its first packet: where its buffer ran dry. Times in seconds
    on any one clock; `add(t, seconds)` for each packet in arrival order."""

    def __init__(self):
        self.first: Optional[float] = None  # arrival of the first packet (playback starts then)
        self.last: Optional[float] = None  # arrival of the last packet so far
        self.play_end = 0.0  # when what has arrived so far has finished playing
        self.audio_s = 0.0  # seconds of audio received
        self.stalls: list[float] = []  # each gap: the buffer empty while more audio was still to come

    def add(self, t: float, seconds: float) -> None:
        if self.first is None:
            self.first, self.play_end = t, t
        elif t > self.play_end:
            self.stalls.append(t - self.play_end)
            self.play_end = t
        self.last = t
        self.play_end += seconds
        self.audio_s += seconds

    @property
    def stall_s(self) -> float:
        return float(sum(self.stalls))

    @property
    def max_stall_s(self) -> float:
        return max(self.stalls, default=0.0)

    @property
    def continuous(self) -> bool:
        """No stall longer than STALL_OK_S."""
        return self.max_stall_s <= STALL_OK_S


class _StageCollector:
    """The generating stages' loop accounting as metric families, read from `source()` at each scrape."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.source: Optional[Callable[[], dict[str, dict]]] = None  # {stage: Stage.stats()}

    def _read(self) -> dict[str, dict]:
        for _ in range(3):  # read from the scrape's thread while the stages run: a dict may change under it
            try:
                return self.source() if self.source is not None else {}
            except RuntimeError:
                continue
        return {}

    def collect(self):
        p, stats = self.prefix, self._read()
        running = GaugeMetricFamily(
            f"{p}_stage_requests_running", "Requests a stage is serving (in its batch)", labels=["stage"]
        )
        waiting = GaugeMetricFamily(
            f"{p}_stage_requests_waiting", "Requests ready for a stage and not in its batch", labels=["stage"]
        )
        queue = SummaryMetricFamily(
            f"{p}_stage_queue_seconds",
            "From a request's input being ready at a stage to the start of the step that serves it, per step",
            labels=["stage"],
        )
        batch = SummaryMetricFamily(f"{p}_stage_batch_size", "Requests served per stage step", labels=["stage"])
        step = SummaryMetricFamily(f"{p}_stage_step_seconds", "Seconds per stage step", labels=["stage"])
        for stage, st in stats.items():
            if "steps" not in st or "queued" not in st:
                continue
            running.add_metric([stage], st["running"])
            waiting.add_metric([stage], st["waiting"])
            queue.add_metric([stage], count_value=st["queued"], sum_value=st["queue_s"])
            batch.add_metric([stage], count_value=st["steps"], sum_value=st["step_items"])
            step.add_metric([stage], count_value=st["steps"], sum_value=st["step_s"])
        return [running, waiting, queue, batch, step]


class _EncoderCacheCollector:
    """serve/encoder_cache.py's counters, read from `source()` (EncoderCache.stats) at each scrape."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.source: Optional[Callable[[], dict]] = None

    def collect(self):
        if self.source is None:
            return []
        p, st = self.prefix, self.source()
        hits = CounterMetricFamily(
            f"{p}_encoder_cache_hits",
            "Media items whose embeddings came from the encoder cache (no encoder call)",
            labels=["kind"],
        )
        misses = CounterMetricFamily(f"{p}_encoder_cache_misses", "Media items sent to an encoder", labels=["kind"])
        for kind, n in st["hits"].items():
            hits.add_metric([kind], n)
        for kind, n in st["misses"].items():
            misses.add_metric([kind], n)
        return [
            hits,
            misses,
            CounterMetricFamily(
                f"{p}_encoder_cache_evictions", "Entries dropped to stay within the byte bound", value=st["evictions"]
            ),
            GaugeMetricFamily(f"{p}_encoder_cache_bytes", "Bytes of cached embeddings", value=st["bytes"]),
            GaugeMetricFamily(f"{p}_encoder_cache_entries", "Cached encoder outputs", value=st["entries"]),
        ]


def _latency(name: str, doc: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()) -> Histogram:
    """A histogram of seconds on the shared latency buckets."""
    return Histogram(name, doc, list(labels), buckets=_LATENCY_BUCKETS, registry=registry)


class Metrics:
    """The metric families of one app; `render()` is the /metrics body."""

    def __init__(self, registry: Optional[CollectorRegistry] = None, prefix: str = "omni"):
        self.registry, self.prefix = registry or CollectorRegistry(), prefix
        r, p = self.registry, prefix
        self.requests = Counter(f"{p}_requests", "Chat-completion requests by HTTP status", ["status"], registry=r)
        self.stream_errors = Counter(f"{p}_stream_errors", "Streams that failed after their first byte", registry=r)
        self.cancelled = Counter(f"{p}_requests_cancelled", "Requests whose client went away", registry=r)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests admitted and not finished", registry=r)
        self.waiting = Gauge(
            f"{p}_requests_waiting", "Admitted requests that have no output yet (queue depth)", registry=r
        )
        self.e2e = _latency(f"{p}_request_latency_seconds", "End-to-end latency of successful requests", r)
        self.ttft = _latency(f"{p}_time_to_first_token_seconds", "Arrival to first text delta", r)
        self.ttfap = _latency(f"{p}_time_to_first_audio_seconds", "Arrival to first audio chunk (TTFAP)", r)
        self.speech_ttfap = _latency(
            f"{p}_speech_time_to_first_audio_seconds", "/v1/audio/speech: arrival to first audio chunk", r
        )
        self.speech_requests = Counter(
            f"{p}_speech_requests", "/v1/audio/speech requests by HTTP status", ["status"], registry=r
        )
        self.stage = _latency(f"{p}_stage_latency_seconds", "Time spent per stage per request", r, ("stage",))
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Generated text tokens", registry=r)
        self.audio_seconds = Counter(f"{p}_audio_output_seconds", "Seconds of speech sent", registry=r)
        # vllm-omni's names (audio_ttfp, audio_rtf, audio_underrun, audio_continuity_ok), measured where the server
        # sends: TTFAP of chat and speech streams alike; per stream, generation seconds (arrival to its last audio) /
        # seconds of speech; the gaps a client playing from the first packet would hear (Playback)
        self.audio_ttfp = _latency(f"{p}_audio_ttfp_seconds", "Arrival to first audio packet, chat and speech", r)
        self.audio_rtf = Histogram(
            f"{p}_audio_rtf",
            "Per audio stream: arrival to last audio / seconds of speech",
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.audio_underrun = _latency(
            f"{p}_audio_underrun_seconds",
            "Per audio stream: seconds a real-time player starting at the first packet would wait for audio",
            r,
        )
        self.audio_streams = Counter(f"{p}_audio_streams", "Audio streams finished", registry=r)
        self.audio_continuity_ok = Counter(
            f"{p}_audio_continuity_ok",
            f"Audio streams with no playback gap over {STALL_OK_S * 1000:.0f} ms",
            registry=r,
        )
        self.encoder_batch = Histogram(
            f"{p}_encoder_batch_size", "Items per encoder call", ["kind"], buckets=_BATCH_BUCKETS, registry=r
        )
        # /v1/realtime (serve/api/realtime_session.py): sessions open now; per turn, the commit of the user's audio
        # (server VAD's end of speech or the client's commit) to the first audio delta of the response it triggers;
        # responses cancelled because the user started speaking
        self.realtime_sessions = Gauge(f"{p}_realtime_sessions_active", "Realtime sessions open", registry=r)
        self.realtime_turn_latency = _latency(
            f"{p}_realtime_turn_latency_seconds",
            "Realtime: end of the user's speech (input audio committed) to the reply's first audio delta",
            r,
        )
        self.realtime_barge_ins = Counter(
            f"{p}_realtime_barge_ins", "Realtime responses cancelled because the user started speaking", registry=r
        )
        self._stages = _StageCollector(p)
        r.register(self._stages)
        self._encoder_cache = _EncoderCacheCollector(p)
        r.register(self._encoder_cache)

    def watch_stages(self, source: Optional[Callable[[], dict[str, dict]]]) -> None:
        """Export the stages' running / waiting / queue time / batch size from `source()` at each scrape."""
        self._stages.source = source

    def watch_encoder_cache(self, source: Optional[Callable[[], dict]]) -> None:
        """Export the encoder cache's hits / misses / evictions / bytes from `source()` (EncoderCache.stats)."""
        self._encoder_cache.source = source

    def track(self, speech: bool = False) -> RequestTrack:
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
        self.playback = Playback()  # the audio as a real-time client would play it (send times)
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
                self.m.audio_ttfp.observe(now)
            seconds = len(ev.pcm) / ev.sample_rate
            self.playback.add(now, seconds)
            self.m.audio_seconds.inc(seconds)
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
        pb = self.playback
        if ok and pb.audio_s > 0 and pb.last is not None:
            self.m.audio_rtf.observe(pb.last / pb.audio_s)
            self.m.audio_underrun.observe(pb.stall_s)
            self.m.audio_streams.inc()
            if pb.continuous:
                self.m.audio_continuity_ok.inc()
        if ok:
            elapsed = time.perf_counter() - self.t0
            self.m.e2e.observe(elapsed)
            self.m.observe_stage("end_to_end", elapsed)
