"""The in-process pipeline (tiny) at 8 concurrent text+speech requests of `omni bench`'s c=8 level, started all at
once (as the in-process bench does) or spread evenly over SPREAD_S (as they reach the generating replica through the
Ray app's ingress): each request's time to first audio, and the wall time.

    python tools/arrival_spread.py            # BENCHMARKS.md §10 quotes its output
"""

import asyncio
import time

from omni.serve.bench.config import BenchConfig
from omni.serve.bench.run import ours_one
from omni.serve.bench.workload import load_media, make_request
from omni.serve.pipeline import Pipeline

SPREADS_S = (0.0, 0.25)
REPEATS = 2


async def level(pipeline, media, cfg: BenchConfig, spread: float) -> tuple[float, list[float]]:
    async def one(i: int):
        await asyncio.sleep(spread * i / 7)
        return await ours_one(pipeline, make_request(media, i, True, cfg))

    t0 = time.perf_counter()
    samples = await asyncio.gather(*[one(i) for i in range(8)])
    return time.perf_counter() - t0, [s.ttfap for s in samples]


def main() -> None:
    pipeline = Pipeline.from_pretrained("tiny")
    cfg = BenchConfig(model="tiny", max_tokens=64, speech_tokens=300, inputs=("text", "image", "audio"))
    media = load_media(False)
    asyncio.run(level(pipeline, media, cfg, 0.0))  # warm-up
    for _ in range(REPEATS):
        for spread in SPREADS_S:
            wall, ttfap = asyncio.run(level(pipeline, media, cfg, spread))
            p50 = sorted(ttfap)[len(ttfap) // 2]
            print(
                f"starts over {spread * 1000:.0f} ms: TTFAP p50 {p50:.2f} s, each "
                f"{', '.join(f'{t:.2f}' for t in ttfap)} s; wall {wall:.2f} s"
            )


if __name__ == "__main__":
    main()
