"""Each vocoder step of the c=8 level (tools/arrival_spread.py's requests), started all at once or evenly over
SPREAD_S: when it ran, how many streams it served, how many of those were first chunks; and when each request's first
audio came. What BENCHMARKS.md §10 reads the arrival effect from.

    python tools/vocoder_steps.py
"""

import asyncio
import time

from omni.decoders.loop import VocoderLoop
from omni.serve.bench.config import BenchConfig
from omni.serve.bench.run import ours_one
from omni.serve.bench.workload import load_media, make_request
from omni.serve.pipeline import Pipeline

SPREADS_S = (0.25, 0.0)
SHOWN_STEPS = 4

t0 = 0.0
steps: list[tuple[float, float, int, int]] = []  # (start, end, streams, first chunks), seconds from the level's start
_step = VocoderLoop._step


def traced_step(self, streams):
    start = time.perf_counter() - t0
    first = sum(id(s) not in self._play_end for s in streams)
    out = _step(self, streams)
    steps.append((start, time.perf_counter() - t0, len(streams), first))
    return out


async def level(pipeline, media, cfg: BenchConfig, spread: float) -> list[float]:
    global t0

    async def one(i: int) -> float:
        await asyncio.sleep(spread * i / 7)
        sample = await ours_one(pipeline, make_request(media, i, True, cfg))
        return spread * i / 7 + sample.ttfap

    t0 = time.perf_counter()
    steps.clear()
    return await asyncio.gather(*[one(i) for i in range(8)])


def main() -> None:
    VocoderLoop._step = traced_step  # type: ignore[method-assign]
    pipeline = Pipeline.from_pretrained("tiny")
    cfg = BenchConfig(model="tiny", max_tokens=64, speech_tokens=300, inputs=("text", "image", "audio"))
    media = load_media(False)
    asyncio.run(level(pipeline, media, cfg, 0.0))  # warm-up
    for spread in SPREADS_S:
        firsts = asyncio.run(level(pipeline, media, cfg, spread))
        print(f"starts over {spread * 1000:.0f} ms; first audio at {', '.join(f'{t:.2f}' for t in firsts)} s")
        for start, end, n, first in steps[:SHOWN_STEPS]:
            print(f"  step {start:5.2f}-{end:5.2f} s ({end - start:.2f} s): {n} streams, {first} first chunks")


if __name__ == "__main__":
    main()
