"""`omni bench realtime --sessions 1,4,16`: turn latency with N sessions talking at once (issue 19 item 7).

At each session count N, `repeats` rounds of N concurrent conversations of `turns` spoken questions each, on the
same server as the per-turn table (serve/bench/realtime.py):
- realtime: N SDK sessions, manual turns; each question's 100 ms chunks are sent in real time (each once it has been
  spoken), then the commit and response.create at once; turn latency runs from the commit (the end of the user's
  speech: what the server's `omni_realtime_turn_latency_seconds` measures too, read here from /metrics as a check)
  to the first `response.output_audio.delta`.
- chat: the same N conversations as chat completions (each turn resending the earlier ones, with the realtime
  session's replies), each request sent once its question would have been spoken; TTFAP from the request to the
  first `delta.audio`.
Each session speaks its own copy of the questions (a different +-2 LSB dither per session), so one session's audio
is no encoder-cache hit for another; each path starts a round with an empty cache.

Goals (on tiny): realtime turn latency p50 at 1 session <= the chat path's TTFAP p50 for the same turns; realtime p95
at 4 sessions <= 2x its p50 at 1 session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from typing import Optional

import httpx
import numpy as np

from omni.serve.bench.goals import Goal
from omni.serve.bench.results import Stats

__all__ = ["dithered", "measure_sessions", "session_goals", "goals_json", "sessions_markdown"]

TURN_METRIC = "omni_realtime_turn_latency_seconds"


def dithered(questions: list[bytes], seed: int) -> list[bytes]:
    """The questions with +-2 LSB of noise (seeded): the same speech, other bytes (another encoder-cache key)."""
    rng = np.random.default_rng(seed)
    out = []
    for pcm in questions:
        x = np.frombuffer(pcm, "<i2").astype(np.int32) + rng.integers(-2, 3, len(pcm) // 2)
        out.append(np.clip(x, -32768, 32767).astype("<i2").tobytes())
    return out


async def _server_turns(url: str) -> tuple[float, float]:
    """(count, sum) of the server's realtime turn-latency histogram, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=60) as http:
        text = (await http.get(f"{url}/metrics")).text
    got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    return got.get(TURN_METRIC + "_count", 0.0), got.get(TURN_METRIC + "_sum", 0.0)


def _stats(samples: list[float]) -> dict:
    st = Stats.of(samples)
    assert st is not None, "a level without samples"
    return {"p50_s": st.p50, "p95_s": st.p95, "mean_s": st.mean, "max_s": st.max, "samples_s": samples}


async def measure_sessions(
    client,
    url: str,
    model: str,
    voice: str,
    cfg,
    questions: list[bytes],
    fresh_cache: Callable,
    conversations: tuple[Callable, Callable],
) -> list[dict]:
    """Per session count: realtime turn latency and chat TTFAP over every turn of every session of every round.
    cfg: realtime.py's RealtimeBenchConfig; conversations: its (realtime_conversation, chat_conversation)."""
    realtime_conversation, chat_conversation = conversations
    levels = []
    for n in cfg.sessions:
        samples: dict[str, list[float]] = {"realtime": [], "chat": []}
        count0, sum0 = await _server_turns(url)
        for r in range(cfg.repeats):
            sets = [dithered(questions, 1000 * r + k + 1) for k in range(n)]
            fresh_cache()
            rts = await asyncio.gather(*(realtime_conversation(client, model, voice, q, cfg, paced=True) for q in sets))
            fresh_cache()
            chats = await asyncio.gather(
                *(
                    chat_conversation(client, model, voice, q, [t["reply"] for t in rt], cfg, paced=True)
                    for q, rt in zip(sets, rts)
                )
            )
            samples["realtime"] += [t["ttfa_s"] for rt in rts for t in rt]
            samples["chat"] += [t["ttfa_s"] for chat in chats for t in chat]
            print(f"[bench realtime] {n} sessions: round {r + 1}/{cfg.repeats} done", flush=True)
        count1, sum1 = await _server_turns(url)
        levels.append(
            {
                "sessions": n,
                "turns": len(samples["realtime"]),
                "realtime": _stats(samples["realtime"]),
                "chat": _stats(samples["chat"]),
                "server_turn_mean_s": (sum1 - sum0) / (count1 - count0) if count1 > count0 else None,
                "server_turns": count1 - count0,
            }
        )
    return levels


def session_goals(levels: list[dict]) -> list[Goal]:
    by_n = {lv["sessions"]: lv for lv in levels}
    one, four = by_n.get(1), by_n.get(4)
    return [
        Goal(
            "realtime turn latency p50 at 1 session / chat TTFAP p50 at 1 session (same turns)",
            one["realtime"]["p50_s"] / one["chat"]["p50_s"] if one else None,
            1.0,
            True,
        ),
        Goal(
            "realtime turn latency p95 at 4 sessions / p50 at 1 session",
            four["realtime"]["p95_s"] / one["realtime"]["p50_s"] if one and four else None,
            2.0,
            True,
        ),
    ]


def _s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def sessions_markdown(r: dict) -> str:
    c, levels = r["config"], r["sessions"]
    lines = [
        f"## Turn latency with concurrent sessions ({c['model']}, {c['turns']} spoken turns per session sent in real "
        f"time, {c['repeats']} round(s) per level, replies of {c['max_tokens']} text / {c['speech_tokens']} codec "
        "tokens at most)",
        "",
        "Realtime: commit (end of speech) to the first audio delta; chat: request to the first audio delta "
        "(TTFAP); server: the mean of `omni_realtime_turn_latency_seconds` over the level.",
        "",
        "| sessions | turns | realtime p50 (s) | realtime p95 (s) | chat p50 (s) | chat p95 (s) | "
        "realtime / chat (p50) | server mean (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        rt, ch = lv["realtime"], lv["chat"]
        lines.append(
            f"| {lv['sessions']} | {lv['turns']} | {rt['p50_s']:.3f} | {rt['p95_s']:.3f} | {ch['p50_s']:.3f} | "
            f"{ch['p95_s']:.3f} | {rt['p50_s'] / ch['p50_s']:.2f} | {_s(lv['server_turn_mean_s'])} |"
        )
    lines += ["", "| goal | measured | bound | |", "|---|---:|---:|---|"]
    for g in r["goals"]:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"| {g['name']} | {value} | <= {g['bound']:g} | {verdict} |")
    return "\n".join(lines)


def goals_json(goals: list[Goal]) -> list[dict]:
    return [{**asdict(g), "met": g.met} for g in goals]
