"""`omni bench prefill`: how long prompts arriving at once stall a request that is decoding, per prefill policy of
the engine (EngineConfig.max_prefill_tokens, prefill_chunk_tokens), in one run on one loaded Thinker.

    omni bench prefill --model small                        # ~1 min on 2 CPU cores
    omni bench prefill --model tiny --arrivals 4 --prompt-tokens 500   # smoke run

Per policy: one request decodes alone; once it has written 4 tokens, `arrivals` requests with `prompt-tokens`-token
prompts arrive together. Measured on the running request: its largest gap between two tokens while they prefill
(the stall a streaming client hears as a pause), its p50 gap; on the arrivals: time to first token (p50, max). Every
policy must give the same ids (greedy): the report says so, and the run fails if not. Writes `<out>/prefill.json`
and prints a Markdown table with each policy's stall as a ratio of the unbounded one's.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

__all__ = ["PrefillBenchConfig", "POLICIES", "run_prefill_bench", "markdown", "main"]

# name -> EngineConfig fields; "unbounded" is every ready prompt prefilled before the next decode
POLICIES: dict[str, dict[str, Optional[int]]] = {
    "unbounded": dict(max_prefill_tokens=0, prefill_chunk_tokens=0),
    "budget": dict(max_prefill_tokens=None, prefill_chunk_tokens=0),  # whole prompts, budget = one prompt
    "chunked": dict(max_prefill_tokens=None, prefill_chunk_tokens=None),  # chunk = budget (the --chunk flag)
}


@dataclass(frozen=True)
class PrefillBenchConfig:
    model: str = "small"  # preset, checkpoint directory or hub id
    arrivals: int = 8  # long prompts arriving at once
    prompt_tokens: int = 2000  # tokens per arriving prompt (about)
    chunk: int = 256  # prefill_chunk_tokens (and the per-step budget) of the chunked policy
    running_tokens: int = 64  # tokens the running request writes
    out: str = "out/bench"

    @classmethod
    def from_args(cls, args) -> PrefillBenchConfig:
        kw = {
            k: getattr(args, k)
            for k in ("model", "arrivals", "prompt_tokens", "chunk", "out")
            if getattr(args, k, None) is not None
        }
        return cls(**kw)


@dataclass
class PolicyResult:
    policy: str
    max_prefill_tokens: int
    prefill_chunk_tokens: int
    stall_max_ms: float  # the running request's largest inter-token gap while the arrivals prefill
    gap_p50_ms: float  # its median inter-token gap over the whole run
    arrival_ttft_p50_ms: float
    arrival_ttft_max_ms: float
    prefill_forwards: int
    token_ids: list


def _policy_config(name: str, cfg: PrefillBenchConfig, prompt_len: int):
    from omni.engine import EngineConfig

    fields: dict[str, Any] = dict(POLICIES[name])  # None: filled in below
    if fields["max_prefill_tokens"] is None:
        fields["max_prefill_tokens"] = cfg.chunk if name == "chunked" else prompt_len
    if fields["prefill_chunk_tokens"] is None:
        fields["prefill_chunk_tokens"] = cfg.chunk
    return EngineConfig(max_num_seqs=cfg.arrivals + 1, **fields)


def _prompts(loaded, cfg: PrefillBenchConfig):
    from omni.prompt import prepare_prompt
    from omni.types import ChatRequest, Message

    running = prepare_prompt(loaded.processor, ChatRequest([Message("user", "Tell me a long story.")]))
    tok = loaded.processor.tokenizer
    words = " ".join(f"item{i}" for i in range(cfg.prompt_tokens))  # more than enough tokens, then cut
    words = tok.decode(tok(words, add_special_tokens=False).input_ids[: max(1, cfg.prompt_tokens - 40)])
    long = [
        prepare_prompt(loaded.processor, ChatRequest([Message("user", f"{j}: {words} Summarise.")]))
        for j in range(cfg.arrivals)
    ]
    return running, long


async def _measure(thinker, running, long, cfg: PrefillBenchConfig) -> dict:
    from omni.thinker import ThinkerDone
    from omni.types import MediaEmbeddings, SamplingParams

    stamps: list[float] = []  # the running request's token times
    arrived = asyncio.Event()
    t_arrive = {}

    async def run(i, prompt, n, times=None):
        first = None
        async for ev in thinker.generate(f"r{i}", prompt, MediaEmbeddings(), SamplingParams(max_tokens=n)):
            now = time.perf_counter()
            if isinstance(ev, ThinkerDone):
                return ev.token_ids, first
            if first is None:
                first = now
            if times is not None:
                times.extend([now] * len(ev.token_ids))
                if len(times) >= 4:
                    arrived.set()

    async def arrivals():
        await arrived.wait()
        t_arrive["t"] = time.perf_counter()
        return await asyncio.gather(*[run(j + 1, p, 8) for j, p in enumerate(long)])

    (ids, _), rest = await asyncio.gather(run(0, running, cfg.running_tokens, stamps), arrivals())
    t0 = t_arrive["t"]
    last_first = max(first for _, first in rest)
    pairs = list(zip(stamps, stamps[1:]))
    gaps = [b - a for a, b in pairs]
    during = [b - a for a, b in pairs if b >= t0 and a <= last_first] or gaps  # while the arrivals prefill
    return {
        "ids": [ids] + [r[0] for r in rest],
        "stall_max": max(during),
        "gap_p50": statistics.median(gaps),
        "ttft": sorted(first - t0 for _, first in rest),
    }


def run_prefill_bench(cfg: PrefillBenchConfig, loaded=None, log=print) -> tuple[int, list[PolicyResult]]:
    """-> (the arriving prompts' length in tokens, one result per policy)."""
    from omni.checkpoint import load_model
    from omni.serve.models import thinker_of

    loaded = loaded or load_model(cfg.model)
    running, long = _prompts(loaded, cfg)
    prompt_len = int(long[0].input_ids.shape[0])
    results = []
    for name in POLICIES:
        ec = _policy_config(name, cfg, prompt_len)
        thinker = thinker_of(loaded, ec, max_model_len=prompt_len + 1024)
        asyncio.run(_measure(thinker, running, long[:1], replace(cfg, arrivals=1, running_tokens=8)))  # warm-up
        forwards = thinker.engine.num_prefill_chunks
        m = asyncio.run(_measure(thinker, running, long, cfg))
        r = PolicyResult(
            name,
            ec.max_prefill_tokens,
            ec.prefill_chunk_tokens,
            m["stall_max"] * 1e3,
            m["gap_p50"] * 1e3,
            statistics.median(m["ttft"]) * 1e3,
            m["ttft"][-1] * 1e3,
            thinker.engine.num_prefill_chunks - forwards,
            m["ids"],
        )
        log(
            f"  {name:10s} stall {r.stall_max_ms:8.1f} ms   gap p50 {r.gap_p50_ms:6.1f} ms   arrivals TTFT p50 "
            f"{r.arrival_ttft_p50_ms:8.1f} ms max {r.arrival_ttft_max_ms:8.1f} ms   ({r.prefill_forwards} prefill "
            f"forwards)"
        )
        results.append(r)
    return prompt_len, results


def markdown(results: list[PolicyResult], cfg: PrefillBenchConfig, prompt_len: int) -> str:
    base = results[0].stall_max_ms
    same = all(r.token_ids == results[0].token_ids for r in results)
    lines = [
        f"`omni bench prefill --model {cfg.model} --arrivals {cfg.arrivals} --prompt-tokens {cfg.prompt_tokens} "
        f"--chunk {cfg.chunk}`: {cfg.arrivals} prompts of {prompt_len} tokens arrive while one request decodes.",
        "",
        "| policy | max_prefill_tokens | prefill_chunk_tokens | running request's stall | vs unbounded "
        "| its gap p50 | arrivals' TTFT p50 | TTFT max | prefill forwards |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.max_prefill_tokens or 'none'} | {r.prefill_chunk_tokens or 'whole'} | "
            f"{r.stall_max_ms:.0f} ms | {r.stall_max_ms / base:.2f}x | {r.gap_p50_ms:.1f} ms | "
            f"{r.arrival_ttft_p50_ms:.0f} ms | {r.arrival_ttft_max_ms:.0f} ms | {r.prefill_forwards} |"
        )
    lines += ["", f"Token ids equal across policies (greedy): {'yes' if same else 'NO'}."]
    return "\n".join(lines)


def main(args) -> int:
    cfg = PrefillBenchConfig.from_args(args)
    from omni.checkpoint import load_model

    loaded = load_model(cfg.model)
    print(f"omni bench prefill: {cfg.model}, {cfg.arrivals} arrivals of ~{cfg.prompt_tokens} tokens, chunk {cfg.chunk}")
    prompt_len, results = run_prefill_bench(cfg, loaded)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill.json").write_text(
        json.dumps(
            {"config": asdict(cfg), "prompt_tokens": prompt_len, "results": [asdict(r) for r in results]}, indent=1
        )
    )
    md = markdown(results, cfg, prompt_len)
    (out / "prefill.md").write_text(md + "\n")
    print(md)
    if any(r.token_ids != results[0].token_ids for r in results):
        print("omni bench prefill: the policies gave different token ids", flush=True)
        return 1
    return 0
