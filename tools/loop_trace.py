"""Summarise a step trace (OMNI_LOOP_TRACE, omni/loop.py): per loop, its steps, their mean keys, the seconds they
took, how much of that its worker thread was on a CPU, and its minor page faults per step; `--steps LOOP` lists
that loop's steps. How BENCHMARKS.md §10 found the replicas' page faults:

    OMNI_LOOP_TRACE=/tmp/steps.jsonl omni bench --via http ...   # every process of the run appends to it
    python tools/loop_trace.py /tmp/steps.jsonl [--since UNIX_S] [--steps vocoder]
"""

import argparse
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--since", type=float, default=0.0, help="only steps that start at or after this Unix time")
    ap.add_argument("--steps", metavar="LOOP", help="list this loop's steps (seconds from the first step shown)")
    args = ap.parse_args()
    with open(args.path) as f:
        steps = [s for s in map(json.loads, f) if s["start"] >= args.since]
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
