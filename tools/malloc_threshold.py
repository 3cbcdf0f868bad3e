"""How glibc's mmap threshold (M_MMAP_THRESHOLD, which serve/cluster/deployments.py fixes in every stage replica)
changes the vocoder's step time: the same 8 streams of 150 codes vocoded chunk by chunk, at each threshold in turn,
interleaved over REPEATS rounds in one process (so the machine's drift hits every setting alike). The trim threshold
is held at the replicas' 1 GiB throughout: fixing the mmap threshold drops glibc's dynamic trim threshold to 128 KiB,
which made every setting fault its pages in again (stop 24's table in BENCHMARKS.md §10 was measured so; stop 25's
section measures the whole pipeline with both thresholds through glibc's MALLOC_*_ environment variables).

    python tools/malloc_threshold.py            # BENCHMARKS.md §10 quotes its output
"""

import ctypes
import random
import time

import torch

from omni.decoders.token2wav import Token2Wav
from omni.serve.cluster.deployments import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES

THRESHOLDS = {"1 MiB": 1 << 20, "4 MiB": 4 << 20, "32 MiB": 32 << 20}
REPEATS = 3


def vocode_8_streams(voc: Token2Wav) -> float:
    streams = [voc.open_stream(voc.voices[0], seed=i, max_codes=400) for i in range(8)]
    rng = random.Random(0)
    for s in streams:
        s.push([rng.randrange(100) for _ in range(150)], last=True)
    t0 = time.perf_counter()
    while any(s.ready for s in streams):
        voc.step([s for s in streams if s.ready], chunks_per_stream=1)
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)  # as a replica with under 2 CPUs reserved
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)  # the replicas' setting
    voc = Token2Wav.from_pretrained("tiny")
    vocode_8_streams(voc)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in THRESHOLDS}
    for _ in range(REPEATS):
        for name, threshold in THRESHOLDS.items():
            libc.mallopt(_M_MMAP_THRESHOLD, threshold)
            libc.malloc_trim(0)
            vocode_8_streams(voc)  # settle at this threshold
            seconds[name].append(vocode_8_streams(voc))
    for name, runs in seconds.items():
        print(f"threshold {name:>6}: {', '.join(f'{s:.2f}' for s in runs)} s (best {min(runs):.2f} s)")


if __name__ == "__main__":
    main()
