"""`omni bench load`'s results, typed (results.json is `asdict` of them), and their Markdown table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["Outcome", "Percentiles", "Phase", "ReplicaMemory", "LoadResults", "OUTCOME_KINDS", "markdown"]

# what one request came to: ok (200, the stream ended with a finish_reason and [DONE]); refused (503 with a
# Retry-After, before any byte); error_event (200, then an SSE error event and [DONE]); http_error (any other
# status); incomplete (the stream ended without [DONE] or without a finish_reason); transport (connection reset or
# refused); timeout (no end within the request timeout: a hang)
OUTCOME_KINDS = ("ok", "refused", "error_event", "http_error", "incomplete", "transport", "timeout")


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it; times in seconds from the start of the run."""

    kind: str  # one of OUTCOME_KINDS
    status: Optional[int]  # the HTTP status; None when no response came
    speak: bool  # asked for speech
    start: float
    end: float
    ttft: Optional[float] = None  # first text delta, from the request's start
    ttfap: Optional[float] = None  # first audio delta, from the request's start
    completion_tokens: int = 0  # from the usage chunk
    audio_s: float = 0.0  # seconds of speech received
    retry_after: Optional[str] = None  # the Retry-After header of a 503
    error_code: Optional[str] = None  # the error body's (or SSE error event's) code
    text: str = field(default="", repr=False)  # the reply's text deltas, joined
    audio_chunks: tuple = field(default=(), repr=False)  # (arrival s from the request's start, seconds of audio)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Percentiles:
    """Over a phase's completed requests, seconds."""

    mean: float
    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Optional[Percentiles]:
        if not values:
            return None
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.mean()), float(np.percentile(v, 50)), float(np.percentile(v, 95)), float(v.max()))


@dataclass(frozen=True)
class Phase:
    """The requests started in one phase (warm-up, or the measured load)."""

    seconds: float  # the phase's wall time: clients start requests for its duration, then finish the ones started
    requests: int  # requests sent (a retry after a 503 is another request)
    speech_requests: int  # of them, asking for speech
    outcomes: dict[str, int]  # kind -> count, every kind of OUTCOME_KINDS
    statuses: dict[str, int]  # HTTP status -> count ("none": no response)
    refused_without_retry_after: int  # 503s that lacked the header (should be 0)
    retry_after: list[str]  # the distinct Retry-After values seen
    completed_per_s: float  # ok requests / seconds
    completion_tokens: int  # text tokens of the ok requests
    audio_s: float  # seconds of speech of the ok requests
    e2e_s: Optional[Percentiles]  # ok requests, start to [DONE]
    ttft_s: Optional[Percentiles]  # ok requests with text
    ttfap_s: Optional[Percentiles]  # ok speech requests with audio
    longest_s: float  # the longest request of any kind (a bound on how long one may hang)

    @classmethod
    def of(cls, outcomes: list[Outcome], seconds: float) -> Phase:
        kinds = {k: sum(o.kind == k for o in outcomes) for k in OUTCOME_KINDS}
        statuses: dict[str, int] = {}
        for o in outcomes:
            key = str(o.status) if o.status is not None else "none"
            statuses[key] = statuses.get(key, 0) + 1
        ok = [o for o in outcomes if o.kind == "ok"]
        refused = [o for o in outcomes if o.status == 503]  # "refused" when it had a Retry-After, else "http_error"
        return cls(
            seconds=seconds,
            requests=len(outcomes),
            speech_requests=sum(o.speak for o in outcomes),
            outcomes=kinds,
            statuses=dict(sorted(statuses.items())),
            refused_without_retry_after=sum(o.retry_after is None for o in refused),
            retry_after=sorted({o.retry_after for o in refused if o.retry_after is not None}),
            completed_per_s=len(ok) / seconds if seconds > 0 else 0.0,
            completion_tokens=sum(o.completion_tokens for o in ok),
            audio_s=sum(o.audio_s for o in ok),
            e2e_s=Percentiles.of([o.seconds for o in ok]),
            ttft_s=Percentiles.of([o.ttft for o in ok if o.ttft is not None]),
            ttfap_s=Percentiles.of([o.ttfap for o in ok if o.ttfap is not None]),
            longest_s=max((o.seconds for o in outcomes), default=0.0),
        )

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status other than the 503 refusals."""
        return sum(n for s, n in self.statuses.items() if s.isdigit() and int(s) >= 500 and s != "503")


@dataclass(frozen=True)
class ReplicaMemory:
    deployment: str
    replica: str  # the replica actor's name
    node_id: str
    pid: int
    rss_start_mb: Optional[float]  # settled after the warm-up (its lowest over the settle window); None: unreadable
    rss_end_mb: Optional[float]  # settled after the load
    rss_max_mb: Optional[float]  # the largest sample: during the load and in the two settle windows
    rss_samples_mb: list[Optional[float]] = dataclasses.field(default_factory=list)  # every sample, in order
    anon_start_mb: Optional[float] = None  # the anonymous part of RSS (heap, tensors) at the start: a leak grows it;
    #                                        RSS also counts file pages, which the kernel evicts under memory pressure
    anon_end_mb: Optional[float] = None

    @property
    def change(self) -> Optional[float]:
        """end / start - 1."""
        if not self.rss_start_mb or self.rss_end_mb is None:
            return None
        return self.rss_end_mb / self.rss_start_mb - 1


@dataclass(frozen=True)
class LoadResults:
    url: str
    model: Optional[str]  # when this run started the server (--model); None for --url
    config: Optional[str]
    max_concurrent_requests: Optional[int]  # the server's limit when known (from --config): 503s past it
    clients: int
    settings: dict  # the LoadConfig fields
    warmup: Phase
    load: Phase
    replicas: list[ReplicaMemory]  # empty when the server's Ray could not be reached
    rss_tolerance: float  # |end / start - 1| allowed for "flat"
    notes: list[str]
    wall_s: float

    @property
    def rss_flat(self) -> Optional[bool]:
        changes = [r.change for r in self.replicas if r.change is not None]
        return None if not changes else all(abs(c) <= self.rss_tolerance for c in changes)

    @property
    def passed(self) -> bool:
        """No 5xx but 503 refusals (each with Retry-After), every other request completed, RSS flat (when read)."""
        p = self.load
        return (
            p.server_errors == 0
            and p.refused_without_retry_after == 0
            and p.outcomes["ok"] + p.outcomes["refused"] == p.requests
            and self.rss_flat is not False
        )

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(rss_flat=self.rss_flat, passed=self.passed, server_errors=self.load.server_errors)
        for r, d in zip(self.replicas, out["replicas"]):
            d["change"] = r.change
        return out


def _ms(p: Optional[Percentiles], field: str) -> str:
    return "-" if p is None else f"{getattr(p, field) * 1000:.0f}"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}"


def markdown(r: LoadResults) -> str:
    p, s = r.load, r.settings
    limit = f", server limit {r.max_concurrent_requests} concurrent requests" if r.max_concurrent_requests else ""
    lines = [
        f"# omni bench load: {r.clients} streaming clients for {s['duration']:g} s against {r.url}",
        "",
        f"Model {r.model or '(a running server)'}, config {r.config or '-'}{limit}. Each client sends its next "
        f"request when the last one ends (after Retry-After on a 503); mix: {', '.join(s['mix'])}; at most "
        f"{s['max_tokens']} text and {s['speech_tokens']} codec tokens per reply; greedy. Warm-up: "
        f"{r.warmup.seconds:.0f} s at the same load ({r.warmup.requests} requests, not below). The measured phase "
        f"took {p.seconds:.0f} s with its last requests finishing; ok/s is over that time.",
        "",
        "| requests | ok | refused (503) | other | 5xx but 503 | ok/s | text tok | speech s | e2e p50 / p95 (ms) "
        "| TTFT p50 / p95 (ms) | TTFAP p50 / p95 (ms) | longest (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    other = p.requests - p.outcomes["ok"] - p.outcomes["refused"]
    lines.append(
        f"| {p.requests} | {p.outcomes['ok']} | {p.outcomes['refused']} | {other} | {p.server_errors} | "
        f"{p.completed_per_s:.2f} | {p.completion_tokens} | {p.audio_s:.1f} | "
        f"{_ms(p.e2e_s, 'p50')} / {_ms(p.e2e_s, 'p95')} | {_ms(p.ttft_s, 'p50')} / {_ms(p.ttft_s, 'p95')} | "
        f"{_ms(p.ttfap_s, 'p50')} / {_ms(p.ttfap_s, 'p95')} | {p.longest_s:.1f} |"
    )
    lines += [
        "",
        "Statuses: "
        + ", ".join(f"{k}: {v}" for k, v in p.statuses.items())
        + "; outcomes: "
        + ", ".join(f"{k}: {v}" for k, v in p.outcomes.items() if v)
        + (f"; Retry-After: {', '.join(p.retry_after)} s" if p.retry_after else ""),
    ]
    if r.replicas:
        lines += [
            "",
            f"## Replica memory (RSS, MiB; flat = within {r.rss_tolerance:.0%})",
            "",
            "| deployment | replica | pid | start | end | max | change | anonymous start / end |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in r.replicas:
            change = "-" if m.change is None else f"{m.change:+.1%}"
            lines.append(
                f"| {m.deployment} | {m.replica.rsplit('#', 1)[-1]} | {m.pid} | {_mb(m.rss_start_mb)} | "
                f"{_mb(m.rss_end_mb)} | {_mb(m.rss_max_mb)} | {change} | {_mb(m.anon_start_mb)} / "
                f"{_mb(m.anon_end_mb)} |"
            )
    flat = {True: "flat", False: "NOT flat", None: "not read"}[r.rss_flat]
    lines += [
        "",
        f"**{'PASS' if r.passed else 'FAIL'}**: {p.server_errors} 5xx but 503, "
        f"{p.refused_without_retry_after} 503 without Retry-After, {other} requests neither completed nor "
        f"refused; RSS {flat}. Whole run {r.wall_s:.0f} s.",
    ]
    lines += [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"
