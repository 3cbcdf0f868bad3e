"""The latency goals of issue #12, checked on a bench run's own numbers (met, missed, or not measured when the run
lacks the level): the Markdown section report.py adds and BENCHMARKS.md quotes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omni.serve.bench.results import BenchResults, Level

__all__ = ["Goal", "goals"]

RTF_KEEPS_UP = 0.8  # a level whose aggregate RTF is below this should play every stream without a stall


@dataclass(frozen=True)
class Goal:
    name: str
    value: Optional[float]  # the measured quantity; None when the run has no level to measure it on
    bound: float
    at_most: bool  # value <= bound (else value >= bound)
    detail: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value <= self.bound if self.at_most else self.value >= self.bound


def _closed(results: BenchResults, mode: str) -> dict[int, Level]:
    return {lv.concurrency: lv for lv in results.levels if lv.mode == mode and not lv.request_rate}


def goals(results: BenchResults) -> list[Goal]:
    speech = _closed(results, "text+speech")
    lo, hi = (min(speech), max(speech)) if speech else (None, None)
    first, last = (speech[lo], speech[hi]) if speech else (None, None)

    def value(fn):
        try:
            return fn()
        except (TypeError, AttributeError, ZeroDivisionError):  # a missing level or statistic
            return None

    out = [
        Goal(
            f"TTFAP p50 at c={lo} / official full-response time (mean)",
            value(lambda: first.ours.ttfap_s.p50 / first.official.e2e_s.mean),
            0.10,
            True,
        ),
        Goal(
            f"TTFAP p50 / end to end p50, ours at c={lo}",
            value(lambda: first.ours.ttfap_s.p50 / first.ours.e2e_s.p50),
            0.20,
            True,
        ),
        Goal(
            f"TTFAP p95 at c={hi} / TTFAP p50 at c={lo}",
            value(lambda: last.ours.ttfap_s.p95 / first.ours.ttfap_s.p50) if hi != lo else None,
            3.0,
            True,
        ),
        Goal(
            f"TTFAP p50 at c={hi} / TTFAP p50 at c={lo}",
            value(lambda: last.ours.ttfap_s.p50 / first.ours.ttfap_s.p50) if hi != lo else None,
            2.5,
            True,
        ),
        Goal(
            f"text+speech req/s at c={hi} / the official path's at c={lo} (sequential)",
            value(lambda: last.ours.req_per_s / first.official.req_per_s),
            5.0,
            False,
        ),
    ]
    keeps_up = [
        lv
        for lv in results.levels
        if lv.mode != "text" and lv.ours.rtf is not None and lv.ours.rtf < RTF_KEEPS_UP and lv.ours.stall_s is not None
    ]
    worst = min((lv.ours.continuity_ok for lv in keeps_up), default=None)
    out.append(
        Goal(
            f"share of streams without a stall over 50 ms, at every level with RTF < {RTF_KEEPS_UP}",
            worst,
            1.0,
            False,
            ", ".join(f"{lv.mode} {lv.label}: {lv.ours.continuity_ok:.0%}" for lv in keeps_up)
            or "no level had RTF < 0.8",
        )
    )
    return out
