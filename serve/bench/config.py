"""`omni bench`'s settings (serve/bench/run.py): what is measured (modes, inputs, load levels, lengths), through what
(`via`: the pipeline in process or the Serve app over HTTP), and the smoke run's (`QUICK`); validated at
construction, built from the CLI's flags by `BenchConfig.from_args`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from omni.serve.bench.workload import INPUT_KINDS, MODES

__all__ = ["BenchConfig", "QUICK", "VIAS"]

VIAS = ("pipeline", "http")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"  # preset (tiny, small, tiny-qwen3, small-qwen3), checkpoint directory or hub id
    out: str = "out/bench"  # where results.json / results.md / results.png go
    via: str = "pipeline"  # ours in process ("pipeline") or the Serve app over HTTP ("http")
    url: Optional[str] = None  # with via http: a running server; None: start `omni serve --model --config` here
    config: str = "tiny"  # with via http and no url: the serve config (configs/serve name or YAML path)
    concurrency: tuple[int, ...] = (1, 4, 16)  # closed loop: clients sending at once, one load level each
    request_rate: tuple[float, ...] = ()  # open loop: Poisson arrivals at these requests/s, one level each
    requests: int = 4  # requests per level at least; a closed-loop level sends max(c, requests)
    modes: tuple[str, ...] = ("text", "text+speech", "speech")  # of MODES
    max_tokens: int = 100  # text tokens per reply at most (greedy Thinker; a random checkpoint rarely stops early)
    speech_tokens: int = 300  # codec tokens per reply at most (greedy Talker; Qwen2.5: 50 per s: 6 s; Qwen3: frames)
    inputs: tuple[str, ...] = INPUT_KINDS  # request i carries inputs[i % len]; of INPUT_KINDS (audio: ours pads its
    #                                       features to the clip, the official processor to 300 s, ~0.5 s of CPU)
    seed: int = 0  # the open-loop arrivals' seed
    encoder_items: int = 8  # batch size of the batched encoder measurement (vs batch 1)
    encoder_repeats: int = 3  # each encoder timing is the best of this many
    device: Optional[str] = None  # torch device; None: cuda when available, else cpu
    plot: bool = True  # write results.png (needs matplotlib: pip install -e ".[bench]")
    encoders: bool = True  # measure the encoders' batch gain (phase 2)

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.requests < 1 or self.max_tokens < 2 or self.speech_tokens < 1 or self.encoder_items < 1:
            raise ValueError(
                "requests, speech_tokens and encoder_items must be >= 1 and max_tokens >= 2 "
                "(a one-token reply makes the official talker raise)"
            )
        if not self.inputs or set(self.inputs) - set(INPUT_KINDS):
            raise ValueError(f"inputs must be among {', '.join(INPUT_KINDS)}, got {', '.join(self.inputs)}")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes must be among {', '.join(MODES)}, got {', '.join(self.modes)}")
        if self.via not in VIAS:
            raise ValueError(f"via must be one of {', '.join(VIAS)}, got {self.via!r}")
        if any(not 0 < r < float("inf") for r in self.request_rate):
            raise ValueError(f"request rates must be > 0 and finite, got {self.request_rate}")

    @classmethod
    def from_args(cls, args) -> BenchConfig:
        """From argparse args; flags absent from `args` or left at None take the defaults (QUICK's with --quick)."""
        base: dict[str, Any] = dict(QUICK) if getattr(args, "quick", False) else {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is None:
                continue
            if f.name in ("concurrency", "inputs", "modes", "request_rate") and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
                value = {
                    "concurrency": lambda v: tuple(int(x) for x in v),
                    "request_rate": lambda v: tuple(float(x) for x in v),
                }.get(f.name, tuple)(value)
            base[f.name] = value
        if getattr(args, "no_plot", False):
            base["plot"] = False
        if getattr(args, "no_encoders", False):
            base["encoders"] = False
        return cls(**base)


# a smoke run: two levels, two requests each, few tokens, text and image, small encoder batches (~40 s on tiny)
QUICK: dict[str, Any] = dict(
    concurrency=(1, 2),
    requests=2,
    max_tokens=8,
    speech_tokens=32,
    inputs=("text", "image"),
    encoder_items=4,
    encoder_repeats=1,
)
