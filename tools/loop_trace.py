"""Summarise a step trace (OMNI_LOOP_TRACE, omni/loop.py): per loop, its steps, their mean keys, the seconds they
took, how much of that its worker thread was on a CPU, and its minor page faults per step; `--steps LOOP` lists
that loop's steps. How BENCHMARKS.md §10 found the replicas' page faults:

    OMNI_LOOP_TRACE=/tmp/steps.jsonl omni bench --via http ...   # every process of the run appends to it
    python tools/loop_trace.py /tmp/steps.jsonl [--since UNIX_S] [--steps vocoder] [--to-first-audio]

--to-first-audio keeps the steps of the first concurrent level (from the first step of the Thinker's first burst that
holds several rows) up to the vocoder's first step in it: how BENCHMARKS.md §10 ("Stop 27") compared the steps that
come before the first audio at c=8, in process and over HTTP.
"""

import argparse
import json
from collections import defaultdict

BURST_GAP_S = 0.3  # a pause between Thinker steps longer than this separates two bursts (levels, warm-up requests)


def to_first_audio(steps: list[dict]) -> tuple[list[dict], str]:
    """The steps from the start of the Thinker's first burst with several rows to the vocoder's first step after it,
    and a line that says when that step came and when the burst's Thinker held all its rows."""
    thinker = [s for s in steps if s["loop"] == "thinker"]
    i = next(k for k, s in enumerate(thinker) if s["keys"] >= 2)
    while i > 0 and thinker[i]["start"] - thinker[i - 1]["end"] < BURST_GAP_S:
        i -= 1
    j = i + 1  # the burst: thinker[i:j], up to the next pause (a later level is not this one)
    while j < len(thinker) and thinker[j]["start"] - thinker[j - 1]["end"] < BURST_GAP_S:
        j += 1
    burst = thinker[i:j]
    t0 = burst[0]["start"]
    t1 = next(s["start"] for s in steps if s["loop"] == "vocoder" and s["start"] >= t0)
    rows = max(s["keys"] for s in burst)
    full = next(s["start"] for s in burst if s["keys"] == rows)
    line = (
        f"first audio step {t1 - t0:.2f} s after the level's first Thinker step; the Thinker held all {rows} rows "
        f"from {full - t0:.2f} s"
    )
    return [s for s in steps if t0 <= s["start"] < t1], line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--since", type=float, default=0.0, help="only steps that start at or after this Unix time")
    ap.add_argument("--steps", metavar="LOOP", help="list this loop's steps (seconds from the first step shown)")
    ap.add_argument("--to-first-audio", action="store_true", help="the first concurrent level, up to its first audio")
    args = ap.parse_args()
    with open(args.path) as f:
        steps = sorted((s for s in map(json.loads, f) if s["start"] >= args.since), key=lambda s: s["start"])
    if args.to_first_audio:
        steps, line = to_first_audio(steps)
        print(line)
    by_loop = defaultdict(list)
    for s in steps:
        by_loop[s["loop"]].append(s)
    for name, ss in sorted(by_loop.items()):
        wall = sum(s["end"] - s["start"] for s in ss)
        cpu = sum(s["cpu_s"] or 0.0 for s in ss)
        faults = sum(s["minflt"] or 0 for s in ss)
        print(
            f"{name}: {len(ss)} steps, {sum(s['keys'] for s in ss) / len(ss):.1f} keys each, {wall:.2f} s "
            f"({wall / len(ss) * 1000:.1f} ms each), on a CPU {cpu / wall if wall else 0:.0%} of it, "
            f"{faults / len(ss):.0f} minor page faults per step"
        )
    if args.steps:
        t0 = min((s["start"] for s in steps), default=0.0)
        for s in by_loop.get(args.steps, []):
            print(
                f"  {s['start'] - t0:8.3f}-{s['end'] - t0:8.3f} s  {s['keys']:3d} keys  cpu {s['cpu_s'] or 0:.3f} s  "
                f"{s['minflt']} faults"
            )


if __name__ == "__main__":
    main()
