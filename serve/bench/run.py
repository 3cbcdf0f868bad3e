"""`omni bench`: our streaming pipeline side by side with the official transformers path, in one run, on the same
checkpoint (the Pipeline and the official `generate` share the loaded model).

    omni bench --model tiny --out out/bench        # ~1-2 min on 2 CPU cores; --quick for a smoke run
    omni bench --model small                        # the preset where compute outweighs Python overhead
    omni bench --model tiny,tiny-qwen3              # Qwen2.5 and Qwen3 side by side: out/<model>/ each, and
                                                    # out/compare.md with their ratios in one table

Qwen3-Omni counts speech in frames (80 ms, 16 codebook ids each), Qwen2.5 in codec ids (20 ms): `speech_tokens`
bounds either, so the same setting gives Qwen3 four times the speech.

Phases (progress on stderr):
1. load sweep: for each output mode (text-only, text+speech) and concurrency c, c closed-loop clients send
   max(c, requests) requests, first to our pipeline (concurrent, continuously batched), then to the official path
   (`omni.reference.reference_generate`, one request at a time behind a lock, which is how transformers serves them;
   its latency includes the wait in that queue). Both greedy, bounded tokens, the same requests.
2. encoders: items/s of the vision and audio towers at batch 1 vs batch `encoder_items`.
Writes results.json, results.md (also printed) and results.png under `out` (report.py; results typed in results.py).

Time to first text token (TTFT) and to first audio packet (TTFAP) are measured from the request's submission; the
official path streams nothing, so both are its whole `generate` time. TTFT is what a client sees: the first non-empty
text; a reply whose text decodes to nothing (a random checkpoint's ids beyond its tokenizer) has none and is counted
in `visible_text` instead. Real-time factor (RTF): wall seconds of a level / seconds of speech it produced. On a CPU,
read the ratios (ours / official), not the absolute times.
"""
from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Awaitable, Callable, Optional

import numpy as np
import torch

from omni.assets import samples_dir
from omni.serve.bench.results import (BenchResults, EncoderResult, Encoders, Level, Match, Ratios, Stats, Summary)
from omni.reference import reference_generate
from omni.types import (AUDIO_SAMPLE_RATE, AudioChunk, AudioPart, ChatRequest, Finished, ImagePart, Message,
                        SamplingParams, TextDelta, TextPart, VideoPart)

__all__ = ["BenchConfig", "QUICK", "Sample", "run_bench", "summarize", "main"]

SAMPLES_DIR = samples_dir()  # bundled speech.wav, clip.mp4
INPUT_KINDS = ("image", "audio", "video")  # media a benchmark request may carry besides its text
QUESTIONS = [
    "What do you see?", "Describe this in one sentence.", "What colours are there?", "Is anything moving?",
    "Tell me a short story about it.", "What shape is in the middle?", "Where could this be?", "Name three things.",
    "What would you call this picture?", "How does it make you feel?", "Count the objects.", "What is missing?",
    "Explain it to a child.", "Give it a title.", "What happens next?", "Say something nice about it.",
]


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"  # preset (tiny, small, tiny-qwen3, small-qwen3), checkpoint directory or hub id
    out: str = "out/bench"  # where results.json / results.md / results.png go
    concurrency: tuple[int, ...] = (1, 4, 16)  # clients sending at once, one load level each
    requests: int = 2  # requests per level at least; a level sends max(c, requests)
    max_tokens: int = 32  # text tokens per reply at most (greedy Thinker)
    speech_tokens: int = 64  # codec tokens per reply at most (greedy Talker; Qwen2.5: 50 per s, Qwen3: 12.5 frames)
    inputs: tuple[str, ...] = ("image",)  # media in every request, of INPUT_KINDS (audio: ours pads its features to
    #                                       the clip, the official processor to 300 s, ~0.5 s of CPU per request)
    encoder_items: int = 8  # batch size of the batched encoder measurement (vs batch 1)
    encoder_repeats: int = 3  # each encoder timing is the best of this many
    device: Optional[str] = None  # torch device; None: cuda when available, else cpu
    plot: bool = True  # write results.png (needs matplotlib: pip install -e ".[bench]")

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.requests < 1 or self.max_tokens < 2 or self.speech_tokens < 1 or self.encoder_items < 1:
            raise ValueError("requests, speech_tokens and encoder_items must be >= 1 and max_tokens >= 2 "
                             "(a one-token reply makes the official talker raise)")
        if set(self.inputs) - set(INPUT_KINDS):
            raise ValueError(f"inputs must be among {', '.join(INPUT_KINDS)}, got {', '.join(self.inputs)}")

    @classmethod
    def from_args(cls, args) -> "BenchConfig":
        """From argparse args; flags absent from `args` or left at None take the defaults (QUICK's with --quick)."""
        base = dict(QUICK) if getattr(args, "quick", False) else {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is None:
                continue
            if f.name in ("concurrency", "inputs") and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
                value = tuple(int(v) for v in value) if f.name == "concurrency" else value
            base[f.name] = value
        if getattr(args, "no_plot", False):
            base["plot"] = False
        return cls(**base)


# a smoke run: two levels, two requests each, few tokens, small encoder batches (~20 s on tiny, 2 CPU cores)
QUICK = dict(concurrency=(1, 2), requests=2, max_tokens=8, speech_tokens=32, encoder_items=4, encoder_repeats=1)


@dataclass
class Sample:
    """One request's measurements; times in seconds from its submission."""
    ttft: Optional[float]  # first visible text (a non-empty TextDelta); None when the reply's text is empty
    ttfap: Optional[float]  # first audio packet; None for text-only (or no speech produced)
    e2e: float  # last event
    text_tokens: int
    codec_tokens: int
    audio_s: float  # seconds of speech produced
    token_ids: list[int] = field(repr=False)
    codec_ids: list[int] = field(repr=False)


# ---------------------------------------------------------------------------------------------------- media, requests
@dataclass
class Media:
    image: object  # PIL.Image.Image
    audio: np.ndarray  # [n] float32 16 kHz
    video: Optional[object]  # omni.types.Video, or None when not asked for


def drawn_image(i: int, size: tuple[int, int] = (224, 168)):
    """A small drawn picture, different for each i."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        draw.ellipse((x, y, x + 40, y + 40), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def tone(seconds: float, hz: float, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * hz * t) * np.minimum(1, 20 * t)).astype(np.float32)  # [n], 50 ms fade-in


def load_media(with_video: bool) -> Media:
    """The bundled espeak-ng speech (else a tone) and, when asked, the bundled clip with its audio track."""
    from omni.encoders.media import MediaPolicy, load_audio, load_video

    policy = MediaPolicy(allowed_local_media_path=str(SAMPLES_DIR))
    speech = SAMPLES_DIR / "speech.wav"
    audio = load_audio(str(speech), policy) if speech.exists() else tone(3.0, 220.0)
    video = load_video(str(SAMPLES_DIR / "clip.mp4"), policy) if with_video else None
    return Media(drawn_image(0), audio, video)


MODES = ("text", "text+speech", "speech")  # chat text only, chat with speech, /v1/audio/speech (text read aloud)


def make_request(media: Media, i: int, speak, config: BenchConfig) -> ChatRequest:
    """Request i of a level (distinct question per i), greedy Thinker and Talker with bounded tokens, a fresh id.
    speak: False (text), True (text+speech), or "speech": the speech endpoint's request reading question i aloud."""
    if speak == "speech":
        from omni.serve.api.convert import ConvertOptions, to_speech_request
        from omni.serve.api.protocol import SpeechRequest

        talker = {"temperature": 0.0, "max_tokens": config.speech_tokens}
        return to_speech_request(SpeechRequest(input=QUESTIONS[i % len(QUESTIONS)], response_format="pcm",
                                               sampling_params_list=[None, talker]), uuid.uuid4().hex,
                                 ConvertOptions(default_speech_tokens=config.speech_tokens))
    parts = {"image": ImagePart(media.image), "audio": AudioPart(media.audio), "video": VideoPart(media.video)}
    content = [parts[k] for k in config.inputs] + [TextPart(QUESTIONS[i % len(QUESTIONS)])]
    return ChatRequest([Message("user", content)], sampling=SamplingParams(max_tokens=config.max_tokens),
                       talker_sampling=SamplingParams(max_tokens=config.speech_tokens), speak=speak,
                       request_id=uuid.uuid4().hex)


# ---------------------------------------------------------------------------------------------------- the two paths
async def ours_one(pipeline, request: ChatRequest) -> Sample:
    t0 = time.perf_counter()
    first_text = first_audio = None
    n_pcm, fin = 0, None
    async for ev in pipeline.stream(request):
        now = time.perf_counter() - t0
        if isinstance(ev, TextDelta) and ev.text and first_text is None:
            first_text = now
        elif isinstance(ev, AudioChunk):
            first_audio = now if first_audio is None else first_audio
            n_pcm += len(ev.pcm)
        elif isinstance(ev, Finished):
            fin = ev
    e2e = time.perf_counter() - t0
    return Sample(ttft=first_text, ttfap=first_audio, e2e=e2e,
                  text_tokens=fin.completion_tokens, codec_tokens=fin.codec_tokens, audio_s=n_pcm / AUDIO_SAMPLE_RATE,
                  token_ids=list(fin.token_ids), codec_ids=list(fin.codec_ids))


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
        return Sample(ttft=e2e if ref.text else None, ttfap=e2e if audio_s > 0 else None, e2e=e2e,
                      text_tokens=len(ref.token_ids), codec_tokens=len(ref.codec_ids), audio_s=audio_s,
                      token_ids=ref.token_ids, codec_ids=ref.codec_ids)

    return one


async def closed_loop(one: Callable[[ChatRequest], Awaitable[Sample]], requests: list[ChatRequest],
                      concurrency: int, progress: Callable[[int], None]) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request as soon as its last one finished -> (samples in request
    order, wall seconds from the first submission to the last reply)."""
    pending = list(range(len(requests)))
    samples: list[Optional[Sample]] = [None] * len(requests)

    async def client():
        while pending:
            i = pending.pop(0)
            samples[i] = await one(requests[i])
            progress(sum(s is not None for s in samples))

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(min(concurrency, len(requests)))])
    return samples, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- summaries
def summarize(samples: list[Sample], wall_s: float) -> Summary:
    """One backend at one level: throughput over the level's wall time, latency statistics over its requests."""
    audio_s = sum(s.audio_s for s in samples)
    text_tokens, codec_tokens = sum(s.text_tokens for s in samples), sum(s.codec_tokens for s in samples)
    return Summary(
        requests=len(samples), wall_s=wall_s, req_per_s=len(samples) / wall_s,
        text_tokens=text_tokens, text_tokens_per_s=text_tokens / wall_s,
        codec_tokens=codec_tokens, codec_tokens_per_s=codec_tokens / wall_s,
        audio_s=audio_s, rtf=wall_s / audio_s if audio_s > 0 else None,
        ttft_s=Stats.of([s.ttft for s in samples if s.ttft is not None]),
        visible_text=sum(s.ttft is not None for s in samples) / len(samples),  # replies with any text
        ttfap_s=Stats.of([s.ttfap for s in samples if s.ttfap is not None]),
        e2e_s=Stats.of([s.e2e for s in samples]))


def matches(ours: list[Sample], official: list[Sample]) -> Match:
    """Share of requests whose text ids (codec ids) are the same in both paths: a greedy run should give 1.0."""
    n = len(ours)
    return Match(text_ids=sum(a.token_ids == b.token_ids for a, b in zip(ours, official)) / n,
                 codec_ids=sum(a.codec_ids == b.codec_ids for a, b in zip(ours, official)) / n)


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
        print(f"\r[bench {time.perf_counter() - self.t0:6.1f}s] {name}{counts}", end=end, file=self.stream,
              flush=True)


async def load_sweep(pipeline, media: Media, config: BenchConfig, progress: Progress) -> list[Level]:
    """Every (mode, level): ours, then the official path, on the same requests."""
    backends = {"ours": lambda r: ours_one(pipeline, r), "official": official_path(pipeline)}
    progress.note("warm-up: one text+speech request through each path")
    for one in backends.values():
        await one(make_request(media, 0, True, config))
    levels = []
    for mode, speak in zip(MODES, (False, True, "speech")):
        for c in config.concurrency:
            n = max(c, config.requests)
            samples, summary = {}, {}
            for name, one in backends.items():
                reqs = [make_request(media, i, speak, config) for i in range(n)]
                samples[name], wall = await closed_loop(one, reqs, c, progress.phase(f"{mode} c={c} {name}", n))
                summary[name] = summarize(samples[name], wall)
            levels.append(Level(mode, c, n, summary["ours"], summary["official"],
                                Ratios.of(summary["ours"], summary["official"]),
                                matches(samples["ours"], samples["official"])))
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
        one = _best_time(lambda: [enc.encode([it]) for it in items], config.encoder_repeats)
        batched = _best_time(lambda: enc.encode(items), config.encoder_repeats)
        out[name] = EncoderResult(items=k, batch1_items_per_s=k / one, batch_items_per_s=k / batched,
                                  batch_size=k, speedup=one / batched)
    return Encoders(image=out["image"], audio=out["audio"], processor_s=processor_s)


def run_bench(config: BenchConfig, progress: Optional[Progress] = None) -> BenchResults:
    """Load the model once, run every phase, return the results (what results.json holds)."""
    import transformers

    from omni.serve.pipeline import Pipeline

    progress = progress or Progress()
    t0 = time.perf_counter()
    progress.note(f"loading {config.model}")
    pipeline = Pipeline.from_pretrained(config.model, device=config.device)
    media = load_media("video" in config.inputs)
    levels = asyncio.run(load_sweep(pipeline, media, config, progress))
    encoders = bench_encoders(pipeline, media, config, progress)
    device = pipeline.loaded.device
    return BenchResults(
        model=config.model, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        settings={f.name: getattr(config, f.name) for f in fields(config)},
        levels=levels, encoders=encoders, wall_s=time.perf_counter() - t0)


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
