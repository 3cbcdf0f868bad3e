"""`omni bench`'s results, typed: what run.py measures and report.py renders; results.json is `asdict` of them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "Sample",
    "Stats",
    "Summary",
    "Ratios",
    "Match",
    "Level",
    "EncoderResult",
    "Encoders",
    "BenchResults",
    "save_and_print",
]


def save_and_print(out: str, name: str, results: dict, table: str) -> int:
    """A suite's end: its results as `<out>/<name>` (JSON), its Markdown table on stdout; -> 0 (the exit status)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(results, indent=2))
    print(table)
    return 0


@dataclass
class Sample:
    """One request's measurements; times in seconds from its submission."""

    ttft: Optional[float]  # first visible text (a non-empty TextDelta); None when the reply's text is empty
    ttfap: Optional[float]  # first audio packet; None for text-only (or no speech produced)
    e2e: float  # last event
    text_tokens: int
    codec_tokens: int
    audio_s: float  # seconds of speech produced
    token_ids: Optional[list[int]] = field(repr=False)  # None over HTTP (the client sees text, not ids)
    codec_ids: Optional[list[int]] = field(repr=False)
    text: str = field(default="", repr=False)
    audio_chunks: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (arrival s, audio s) each

    def playback(self):
        """The stream played in real time from its first packet (metrics.Playback)."""
        from omni.serve.api.metrics import Playback

        pb = Playback()
        for t, seconds in self.audio_chunks:
            pb.add(t, seconds)
        return pb


# ---------------------------------------------------------------------------------------------------- the two paths


@dataclass(frozen=True)
class Stats:
    """Latency statistics over a level's requests, seconds."""

    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Optional[Stats]:
        if not values:
            return None
        v = np.asarray(values, dtype=np.float64)
        p50, p90, p95, p99 = (float(x) for x in np.percentile(v, [50, 90, 95, 99]))
        return cls(float(v.mean()), p50, p90, p95, p99, float(v.max()))


@dataclass(frozen=True)
class Summary:
    """One backend at one load level: throughput over the level's wall time, latency over its requests."""

    requests: int
    wall_s: float
    req_per_s: float
    text_tokens: int
    text_tokens_per_s: float
    codec_tokens: int
    codec_tokens_per_s: float
    audio_s: float  # seconds of speech produced
    rtf: Optional[float]  # wall seconds / speech seconds; None without speech
    ttft_s: Optional[Stats]  # first visible text; None when no reply had any
    visible_text: float  # share of replies with any text
    ttfap_s: Optional[Stats]  # first audio packet; None for text only
    e2e_s: Stats
    stall_s: Optional[Stats] = None  # per speech stream: seconds a real-time player (from the first packet) waited
    continuity_ok: Optional[float] = None  # share of speech streams with no stall over 50 ms (metrics.STALL_OK_S)


@dataclass(frozen=True)
class Ratios:
    """ours / official of one level (None where either side has no value)."""

    req_per_s: Optional[float]
    text_tokens_per_s: Optional[float]
    ttft: Optional[float]
    ttfap: Optional[float]
    e2e: Optional[float]
    rtf: Optional[float]

    @classmethod
    def of(cls, ours: Summary, official: Summary) -> Ratios:
        def mean(s: Optional[Stats]):
            return None if s is None else s.mean

        pairs = {
            "req_per_s": (ours.req_per_s, official.req_per_s),
            "text_tokens_per_s": (ours.text_tokens_per_s, official.text_tokens_per_s),
            "ttft": (mean(ours.ttft_s), mean(official.ttft_s)),
            "ttfap": (mean(ours.ttfap_s), mean(official.ttfap_s)),
            "e2e": (ours.e2e_s.mean, official.e2e_s.mean),
            "rtf": (ours.rtf, official.rtf),
        }
        return cls(**{k: (a / b if a is not None and b else None) for k, (a, b) in pairs.items()})


@dataclass(frozen=True)
class Match:
    """Share of requests whose ids are the same in both paths (a greedy run gives 1.0)."""

    text_ids: float
    codec_ids: float


@dataclass(frozen=True)
class Level:
    mode: str  # "text", "text+speech" or "speech"
    concurrency: int  # closed loop: clients at once; 0 for an open-loop level (request_rate)
    requests: int
    ours: Summary
    official: Summary
    ratio: Ratios
    match: Match
    request_rate: Optional[float] = None  # open loop: Poisson arrivals at this many requests/s
    stages: dict = dataclasses.field(default_factory=dict)  # ours, per generating stage over the level: steps,
    #   mean_batch (requests per step), busy_s (seconds in steps), busy_share (busy_s / the level's wall time),
    #   mean_queue_ms (input ready -> the step serving it); over HTTP from /metrics (the Ray app refreshes every 2 s)

    @property
    def label(self) -> str:
        return f"{self.request_rate:g}/s" if self.request_rate else f"c={self.concurrency}"


@dataclass(frozen=True)
class EncoderResult:
    items: int
    batch1_items_per_s: float
    batch_items_per_s: float
    batch_size: int
    speedup: float  # batched / batch 1


@dataclass(frozen=True)
class Encoders:
    image: EncoderResult
    audio: EncoderResult
    processor_s: float  # the processor call that made the items (not in the items/s)

    def towers(self) -> dict[str, EncoderResult]:
        return {"image": self.image, "audio": self.audio}


@dataclass(frozen=True)
class BenchResults:
    model: str
    device: str
    device_name: str
    cpu_count: Optional[int]
    torch_threads: int
    versions: dict[str, str]  # torch, transformers
    settings: dict  # the BenchConfig fields
    levels: list[Level]
    encoders: Optional[Encoders]  # None when not measured (--no-encoders)
    wall_s: float
    via: str = "pipeline"  # how ours was driven: "pipeline" (in process) or "http" (streaming clients)
    url: Optional[str] = None  # with via http: the server

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
