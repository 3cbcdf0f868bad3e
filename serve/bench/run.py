"""`omni bench`: our streaming server side by side with the official transformers path, in one run, on the same
checkpoint.

    omni bench --model tiny --quick                 # a smoke run, in process
    omni bench --model tiny,tiny-qwen3 --quick      # Qwen2.5 and Qwen3 side by side: out/<model>/ each, and
                                                    # out/compare.md with their ratios in one table
    omni bench --via http --model small             # `omni serve --model small` started here, streaming HTTP clients
    omni bench --via http --url http://HOST:8000 --model small --request-rate 0.5,1   # a running server, open loop

Ours is driven `--via pipeline` (the in-process pipeline: the same stages, no HTTP, no Ray) or `--via http` (the Serve
app, started here as `omni serve --model --config` unless `--url` names a running one, read through its SSE streams as
a client reads them: serve/bench/http.py). The official path always runs in this process on the same checkpoint.

Qwen3-Omni counts speech in frames (80 ms, 16 codebook ids each), Qwen2.5 in codec ids (20 ms): `speech_tokens`
bounds either, so the same setting gives Qwen3 four times the speech.

Phases (progress on stderr):
1. load sweep: for each output mode (text-only, text+speech, the speech endpoint) and load level, the same requests
   first to ours, then to the official path (`omni.reference.reference_generate`, one request at a time behind a lock,
   which is how transformers serves them; its latency includes the wait in that queue). Closed-loop levels
   (`--concurrency`): c clients, each sending its next request when its last one ends, max(c, requests) requests.
   Open-loop levels (`--request-rate`): `requests` requests arriving as a Poisson process at that rate, whatever is
   still running (as `vllm bench serve --request-rate`). Request i carries the media kind inputs[i % len(inputs)]
   (text, image, audio, video), a distinct question; greedy, bounded tokens.
2. encoders: items/s of the vision and audio towers at batch 1 vs batch `encoder_items`.
Writes results.json, results.md (also printed) and results.png under `out` (report.py; results typed in results.py).

Time to first text token (TTFT) and to first audio packet (TTFAP) are measured from the request's submission; the
official path streams nothing, so both are its whole `generate` time. TTFT is what a client sees: the first non-empty
text; a reply whose text decodes to nothing (a random checkpoint's ids beyond its tokenizer) has none and is counted
in `visible_text` instead. Real-time factor (RTF): wall seconds of a level / seconds of speech it produced. Playback:
each stream is played in real time from its first packet (metrics.Playback); a stall is a wait for the next packet
with the buffer empty; `continuity_ok` is the share of streams with no stall over 50 ms. The official path sends its
speech as one packet: it never stalls, it only starts late. On a CPU, read the ratios (ours / official), not the
absolute times.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from omni.reference import reference_generate
from omni.types import (
    AUDIO_SAMPLE_RATE,
    AudioChunk,
    AudioPart,
    ChatRequest,
    Finished,
    ImagePart,
    Message,
    TextDelta,
    TextPart,
)
from omni.serve.bench.config import QUICK, BenchConfig  # re-exported: the tests and the CLI import them here
from omni.serve.bench.results import BenchResults, EncoderResult, Encoders, Level, Match, Ratios, Sample, Stats, Summary
from omni.serve.bench.workload import QUESTIONS, Media, drawn_image, load_media, make_request, tone

__all__ = ["BenchConfig", "QUICK", "Sample", "run_bench", "summarize", "closed_loop", "open_loop", "main"]


async def ours_one(pipeline, request: ChatRequest) -> Sample:
    t0 = time.perf_counter()
    first_text = first_audio = None
    n_pcm, fin, text, chunks = 0, None, [], []
    async for ev in pipeline.stream(request):
        now = time.perf_counter() - t0
        if isinstance(ev, TextDelta):
            first_text = now if first_text is None and ev.text else first_text
            text.append(ev.text)
        elif isinstance(ev, AudioChunk):
            first_audio = now if first_audio is None else first_audio
            n_pcm += len(ev.pcm)
            chunks.append((now, len(ev.pcm) / AUDIO_SAMPLE_RATE))
        elif isinstance(ev, Finished):
            fin = ev
    e2e = time.perf_counter() - t0
    return Sample(
        ttft=first_text,
        ttfap=first_audio,
        e2e=e2e,
        text_tokens=fin.completion_tokens,
        codec_tokens=fin.codec_tokens,
        audio_s=n_pcm / AUDIO_SAMPLE_RATE,
        token_ids=list(fin.token_ids),
        codec_ids=list(fin.codec_ids),
        text="".join(text),
        audio_chunks=chunks,
    )


def official_path(pipeline) -> Callable[[ChatRequest], Awaitable[Sample]]:
    """The official `generate`, one request at a time (a lock in front of it): no streaming, so the first text and
    the first audio arrive with the whole reply."""
    lock = asyncio.Lock()

    async def one(request: ChatRequest) -> Sample:
        t0 = time.perf_counter()
        async with lock:
            forced = pipeline.thinker.reply_ids(request.forced_reply) if request.forced_reply else None
            ref = await asyncio.to_thread(reference_generate, pipeline.loaded, request, 0, forced)
        e2e = time.perf_counter() - t0
        audio_s = 0.0 if ref.waveform is None else len(ref.waveform) / ref.sample_rate
        return Sample(
            ttft=e2e if ref.text else None,
            ttfap=e2e if audio_s > 0 else None,
            e2e=e2e,
            text_tokens=len(ref.token_ids),
            codec_tokens=len(ref.codec_ids),
            audio_s=audio_s,
            token_ids=ref.token_ids,
            codec_ids=ref.codec_ids,
            text=ref.text,
            audio_chunks=[(e2e, audio_s)] if audio_s > 0 else [],
        )  # one packet: the whole reply

    return one


async def closed_loop(
    one: Callable[[int], Awaitable[Sample]], n: int, concurrency: int, progress: Callable[[int], None]
) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request (`one(i)`, i < n) as soon as its last one finished ->
    (samples in request order, wall seconds from the first submission to the last reply)."""
    pending = list(range(n))
    samples: list[Optional[Sample]] = [None] * n

    async def client():
        while pending:
            i = pending.pop(0)
            samples[i] = await one(i)
            progress(sum(s is not None for s in samples))

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(min(concurrency, n))])
    return samples, time.perf_counter() - t0


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Poisson arrival times (s) of n requests at `rate` per second: the first at 0, exponential gaps after."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


async def open_loop(
    one: Callable[[int], Awaitable[Sample]], n: int, rate: float, seed: int, progress: Callable[[int], None]
) -> tuple[list[Sample], float]:
    """Request i sent at its Poisson arrival time whatever is still running (open loop) -> (samples in request order,
    wall seconds from the first submission to the last reply). Latencies count from each request's own submission."""
    done = 0

    async def send(i: int) -> Sample:
        nonlocal done
        sample = await one(i)
        done += 1
        progress(done)
        return sample

    t0 = time.perf_counter()
    tasks = []
    for i, at in enumerate(arrivals(n, rate, seed)):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        tasks.append(asyncio.ensure_future(send(i)))
    samples = await asyncio.gather(*tasks)
    return list(samples), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- summaries
def summarize(samples: list[Sample], wall_s: float) -> Summary:
    """One backend at one level: throughput over the level's wall time, latency statistics over its requests."""
    audio_s = sum(s.audio_s for s in samples)
    text_tokens, codec_tokens = sum(s.text_tokens for s in samples), sum(s.codec_tokens for s in samples)
    plays = [s.playback() for s in samples if s.audio_chunks]
    return Summary(
        requests=len(samples),
        wall_s=wall_s,
        req_per_s=len(samples) / wall_s,
        text_tokens=text_tokens,
        text_tokens_per_s=text_tokens / wall_s,
        codec_tokens=codec_tokens,
        codec_tokens_per_s=codec_tokens / wall_s,
        audio_s=audio_s,
        rtf=wall_s / audio_s if audio_s > 0 else None,
        ttft_s=Stats.of([s.ttft for s in samples if s.ttft is not None]),
        visible_text=sum(s.ttft is not None for s in samples) / len(samples),  # replies with any text
        ttfap_s=Stats.of([s.ttfap for s in samples if s.ttfap is not None]),
        e2e_s=Stats.of([s.e2e for s in samples]),
        stall_s=Stats.of([p.stall_s for p in plays]),
        continuity_ok=sum(p.continuous for p in plays) / len(plays) if plays else None,
    )


def matches(ours: list[Sample], official: list[Sample]) -> Match:
    """Share of requests whose text ids (codec ids) are the same in both paths: a greedy run should give 1.0. Over
    HTTP, where ids are not sent: the same text (the same number of audio samples)."""
    n = len(ours)
    if any(a.token_ids is None for a in ours):
        return Match(
            text_ids=sum(a.text == b.text for a, b in zip(ours, official)) / n,
            codec_ids=sum(
                round(a.audio_s * AUDIO_SAMPLE_RATE) == round(b.audio_s * AUDIO_SAMPLE_RATE)
                for a, b in zip(ours, official)
            )
            / n,
        )
    return Match(
        text_ids=sum(a.token_ids == b.token_ids for a, b in zip(ours, official)) / n,
        codec_ids=sum(a.codec_ids == b.codec_ids for a, b in zip(ours, official)) / n,
    )


# ---------------------------------------------------------------------------------------------------- the run
class Progress:
    """Phase and request counts on stderr, one line per phase (rewritten in place on a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr  # looked up now: tests replace sys.stderr
        self.t0, self.tty = time.perf_counter(), self.stream.isatty()

    def phase(self, name: str, total: int = 0) -> Callable[[int], None]:
        self._line(name, 0, total, end="\n" if not self.tty else "")

        def done(n: int) -> None:
            if self.tty or n == total:
                self._line(name, n, total, end="\n" if n == total else "")

        return done

    def note(self, text: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)

    def _line(self, name, n, total, end):
        counts = f": {n}/{total} requests done" if total else ""
        print(f"\r[bench {time.perf_counter() - self.t0:6.1f}s] {name}{counts}", end=end, file=self.stream, flush=True)


Backend = Callable[[int, object], Awaitable[Sample]]  # (request index, speak) -> its sample


def make_backends(pipeline, media: Media, config: BenchConfig, http=None) -> dict[str, Backend]:
    """ "ours" (the in-process pipeline, or the server behind `http`, an http.HttpClient) and "official", sending
    request i of `config` (make_request; its HTTP body over HTTP). speak: False, True or "speech"."""
    official = official_path(pipeline)

    def ours(i: int, speak) -> Awaitable[Sample]:
        if http is None:
            return ours_one(pipeline, make_request(media, i, speak, config))
        from omni.serve.bench.http import chat_body, speech_body

        question = QUESTIONS[i % len(QUESTIONS)]
        if speak == "speech":
            return http.speech(speech_body(question, config.speech_tokens))
        return http.chat(
            chat_body(
                question,
                config.inputs[i % len(config.inputs)],
                speak,
                config.max_tokens,
                config.speech_tokens,
                http.parts,
            )
        )

    return {"ours": ours, "official": lambda i, speak: official(make_request(media, i, speak, config))}


async def stage_counters(pipeline, http=None) -> dict[str, dict]:
    """Ours' per-stage loop counters now (omni.loop.LoopStats fields), in process or from the server's /metrics."""
    if http is not None:
        return await http.stage_counters()
    return {k: dict(v) for k, v in pipeline.stage_stats().items()}


def stage_profile(before: dict, after: dict, wall_s: float) -> dict[str, dict]:
    """Where a level's time went, per stage: the counters' change over it."""
    out = {}
    for stage, a in after.items():
        b = before.get(stage, {})
        d = {k: a.get(k, 0) - b.get(k, 0) for k in ("steps", "step_items", "step_s", "queued", "queue_s")}
        if d["steps"] <= 0:
            continue
        out[stage] = {
            "steps": int(d["steps"]),
            "mean_batch": d["step_items"] / d["steps"],
            "busy_s": d["step_s"],
            "busy_share": d["step_s"] / wall_s if wall_s > 0 else None,
            "mean_queue_ms": 1000 * d["queue_s"] / d["queued"] if d["queued"] else None,
        }
    return out


def levels_of(config: BenchConfig) -> list[tuple[int, Optional[float]]]:
    """(concurrency, None) per closed-loop level, then (0, rate) per open-loop one."""
    return [(c, None) for c in config.concurrency] + [(0, r) for r in config.request_rate]


async def load_sweep(pipeline, media: Media, config: BenchConfig, progress: Progress, http=None) -> list[Level]:
    """Every (mode, level): ours, then the official path, on the same requests."""
    backends = make_backends(pipeline, media, config, http)
    progress.note("warm-up: one short text+speech request per input kind through ours, one through the official path")
    short = make_backends(pipeline, media, replace(config, max_tokens=8, speech_tokens=48), http)
    for i in range(len(config.inputs)):
        await short["ours"](i, True)
    await short["official"](0, True)
    levels = []
    for mode in config.modes:
        speak = {"text": False, "text+speech": True, "speech": "speech"}[mode]
        for c, rate in levels_of(config):
            n = max(c, config.requests) if rate is None else config.requests
            samples, summary = {}, {}
            before = await stage_counters(pipeline, http)
            for name, one in backends.items():

                def send(i, one=one, speak=speak):
                    return one(i, speak)

                if rate is None:
                    samples[name], wall = await closed_loop(send, n, c, progress.phase(f"{mode} c={c} {name}", n))
                else:
                    samples[name], wall = await open_loop(
                        send, n, rate, config.seed, progress.phase(f"{mode} {rate:g}/s {name}", n)
                    )
                summary[name] = summarize(samples[name], wall)
                if name == "ours":
                    stages = stage_profile(before, await stage_counters(pipeline, http), wall)
            levels.append(
                Level(
                    mode,
                    c,
                    n,
                    summary["ours"],
                    summary["official"],
                    Ratios.of(summary["ours"], summary["official"]),
                    matches(samples["ours"], samples["official"]),
                    request_rate=rate,
                    stages=stages,
                )
            )
    return levels


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_encoders(pipeline, media: Media, config: BenchConfig, progress: Progress) -> Encoders:
    """Items/s of the vision tower (drawn images) and the audio tower (the speech sample and tones of 1-3 s), one
    item per forward vs all `encoder_items` in one forward; the items come from the model's own processor.
    The processor call that makes the items is timed apart (processor_s)."""
    from omni.prompt import prepare_prompt

    k = config.encoder_items
    audios = [media.audio] + [tone(1.0 + 2.0 * i / max(1, k - 1), 200.0 + 40 * i) for i in range(1, k)]
    parts = [ImagePart(drawn_image(i)) for i in range(k)] + [AudioPart(a) for a in audios]
    progress.note(f"encoders: {k} images and {k} audios through the processor (features, placeholders)")
    t0 = time.perf_counter()
    prompt = prepare_prompt(pipeline.processor, ChatRequest([Message("user", parts + [TextPart("Compare them.")])]))
    processor_s = time.perf_counter() - t0  # one call for all 2k items; not in the items/s below
    out = {}
    for name, enc, items in (("image", pipeline.vision, prompt.images), ("audio", pipeline.audio, prompt.audios)):
        progress.note(f"encoders: {name}, {k} items, batch 1 vs batch {k}")
        enc.encode(items[:1])  # warm-up
        one = _best_time(lambda enc=enc, items=items: [enc.encode([it]) for it in items], config.encoder_repeats)
        batched = _best_time(lambda enc=enc, items=items: enc.encode(items), config.encoder_repeats)
        out[name] = EncoderResult(
            items=k, batch1_items_per_s=k / one, batch_items_per_s=k / batched, batch_size=k, speedup=one / batched
        )
    return Encoders(image=out["image"], audio=out["audio"], processor_s=processor_s)


async def _sweep(pipeline, media: Media, config: BenchConfig, progress: Progress, url: str, transport):
    if config.via == "pipeline":
        return await load_sweep(pipeline, media, config, progress)
    from omni.serve.bench.http import HttpClient, media_parts

    http = HttpClient(
        url, max(config.concurrency + (config.requests,)), media_parts(config.inputs), transport=transport
    )
    try:
        return await load_sweep(pipeline, media, config, progress, http)
    finally:
        await http.aclose()


def run_bench(config: BenchConfig, progress: Optional[Progress] = None, transport=None, pipeline=None) -> BenchResults:
    """Load the model once (or use `pipeline`), run every phase, return the results (what results.json holds). With
    via http, ours is `config.url`, else an `omni serve` started here, else (tests) the ASGI app of `transport`."""
    import transformers

    from omni.serve.pipeline import Pipeline

    progress = progress or Progress()
    t0 = time.perf_counter()
    progress.note(f"loading {config.model}")
    pipeline = pipeline or Pipeline.from_pretrained(config.model, device=config.device)
    media = load_media("video" in config.inputs)
    server, url = None, config.url
    if config.via == "http" and url is None and transport is None:
        from omni.serve.cluster.process import ServeProcess

        log = Path(config.out) / "serve.log"
        progress.note(f"starting omni serve --model {config.model} --config {config.config} (its log: {log})")
        server = ServeProcess(["--model", config.model, "--config", config.config], log).start()
        url = server.url
    try:
        levels = asyncio.run(_sweep(pipeline, media, config, progress, url or "http://app", transport))
    finally:
        if server is not None:
            server.stop()
    encoders = bench_encoders(pipeline, media, config, progress) if config.encoders else None
    device = pipeline.loaded.device
    return BenchResults(
        via=config.via,
        url=url if config.via == "http" else None,
        model=config.model,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        settings={f.name: getattr(config, f.name) for f in fields(config)},
        levels=levels,
        encoders=encoders,
        wall_s=time.perf_counter() - t0,
    )


def main(args) -> int:
    """One model: its report under `out`. Several (`--model tiny,tiny-qwen3`): one after the other, each under
    out/<model>/, and out/compare.md with their ratios against the official path side by side."""
    import dataclasses

    from omni.serve.bench.report import compare_markdown, write_report

    config = BenchConfig.from_args(args)
    models = [m.strip() for m in config.model.split(",") if m.strip()]
    if len(models) == 1:
        print(write_report(run_bench(config), Path(config.out), plot=config.plot))
        return 0
    results = []
    for model in models:
        one = dataclasses.replace(config, model=model, out=str(Path(config.out) / Path(model).name))
        results.append(run_bench(one))
        print(write_report(results[-1], Path(one.out), plot=config.plot))
    md = compare_markdown(results)
    (Path(config.out) / "compare.md").write_text(md)
    print(md)
    return 0
