"""`omni bench`'s command line (serve/cli.py adds it to `omni`): the suites' flags and the dispatch to each suite's
main. Light to import: the suites load their modules (torch, the models) only when run."""

from __future__ import annotations

import importlib
import os

__all__ = ["SUITES", "add_bench_parser", "run_bench_command"]


# each suite's module (its `main(args) -> int`); no suite: the serving bench (run.py)
SUITES = {
    "load": "omni.serve.bench.load",
    "prefill": "omni.serve.bench.prefill",
    "engine": "omni.serve.bench.engine",
    "gpu": "omni.serve.bench.gpu",
    "realtime": "omni.serve.bench.realtime",
    "caption": "omni.serve.bench.caption",
    None: "omni.serve.bench.run",
}


def run_bench_command(args) -> int:
    """`omni bench [SUITE]`: the suite's own main (the serving bench without one), imported only now."""
    suite = getattr(args, "suite", None)
    if suite not in ("engine", "gpu") and getattr(args, "model", None) is None:
        args.model = "tiny"  # bench engine's default is small
    return importlib.import_module(SUITES[suite]).main(args)


def _bench_load_flags(p) -> None:
    """`omni bench load`'s own flags: streaming clients against the Serve app (serve/bench/load.py)."""
    p.add_argument(
        "--url", default=None, help="bench load, bench --via http: a running server (default: start omni serve here)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="bench load, bench --via http: the serve config of the server started here (tiny)",
    )
    p.add_argument("--clients", type=int, default=None, help="bench load: concurrent streaming clients (default 32)")
    p.add_argument("--duration", type=float, default=None, help="bench load: seconds of measured load (default 60)")
    p.add_argument("--warmup", type=float, default=None, help="bench load: seconds of load before it (default 10)")
    p.add_argument(
        "--mix", default=None, help="bench load: request kinds in turn (default text,speech,image,audio+speech)"
    )
    p.add_argument("--api-key", dest="api_key", default=os.environ.get("OMNI_API_KEY"))
    p.add_argument(
        "--ray-address",
        dest="ray_address",
        default=None,
        help="bench load with --url: the server's Ray, to read replica memory (default: RAY_ADDRESS)",
    )


def add_bench_parser(sub) -> None:
    """The `bench` subcommand on `omni`'s subparsers."""
    p = sub.add_parser("bench", help="benchmarks against the official transformers path")
    p.add_argument(
        "suite",
        nargs="?",
        choices=[s for s in SUITES if s],
        default=None,
        help="caption: `omni caption` vs a sequential loop over the official path; load: streaming HTTP "
        "clients against the Serve app (statuses, latencies, 503s, replica memory); prefill: how "
        "long prompts arriving at once stall a decoding request, per prefill policy; engine: the "
        "decode engine alone (step vs batch and context, admission, memory per step); gpu: the GPU "
        "check with random 7B-shaped weights (serve/bench/gpu.py, runs on a bare GPU host); realtime: "
        "time to first audio per turn of a spoken conversation, /v1/realtime vs chat completions",
    )
    p.add_argument("--turns", type=int, default=None, help="bench realtime: spoken questions per conversation (5)")
    p.add_argument("--repeats", type=int, default=None, help="bench realtime: conversations per path (3)")
    p.add_argument(
        "--sessions", default=None, help="bench realtime: concurrent sessions per level, comma-separated (1,4,16)"
    )
    p.add_argument("--files", type=int, default=64, help="bench caption: media files to caption")
    p.add_argument("--arrivals", type=int, default=None, help="bench prefill: long prompts arriving at once (8)")
    p.add_argument(
        "--prompt-tokens",
        dest="prompt_tokens",
        type=int,
        default=None,
        help="bench prefill: tokens per arriving prompt (2000)",
    )
    p.add_argument(
        "--chunk", type=int, default=None, help="bench prefill: the chunked policy's prefill_chunk_tokens (256)"
    )
    p.add_argument("--batches", default=None, help="bench engine: rows in the running batch, comma-separated (1,8,32)")
    p.add_argument("--contexts", default=None, help="bench engine: prompt tokens per row, comma-separated (256,2048)")
    p.add_argument("--steps", type=int, default=None, help="bench engine: decode steps timed per cell (6)")
    p.add_argument(
        "--admit-tokens",
        dest="admit_tokens",
        type=int,
        default=None,
        help="bench engine: the admitted prompt's tokens (256)",
    )
    p.add_argument(
        "--goal-contexts",
        dest="goal_contexts",
        default=None,
        help="bench engine: short,long contexts of the step and allocation goals at 8 rows (100,1500)",
    )
    p.add_argument("--compile", action="store_true", help="bench engine: EngineConfig.compile, where the engine has it")
    p.add_argument("--threads", type=int, default=None, help="bench engine: torch threads on a CPU (cores // 3)")
    p.add_argument("--shape", default="7b", choices=["7b", "tiny"], help="bench gpu: the random model's shape")
    p.add_argument("--stages", default=None, help="bench gpu: a subset of S0,S1,S2,S3,S4,S5")
    p.add_argument(
        "--model",
        default=None,
        help="a model, or several comma-separated to compare them "
        "(default tiny: tiny,tiny-qwen3); bench engine: default small",
    )
    p.add_argument(
        "--out",
        default=None,
        help="results folder (default out/bench, out/bench-load for load, out/bench-engine, out/gpu-check)",
    )
    p.add_argument(
        "--via",
        default=None,
        choices=["pipeline", "http"],
        help="ours in process (pipeline, default) or the Serve app over streaming HTTP (http: starts "
        "omni serve --model --config here unless --url names a running server)",
    )
    p.add_argument("--concurrency", default=None, help="closed-loop levels, comma-separated (default 1,4,16)")
    p.add_argument(
        "--request-rate",
        dest="request_rate",
        default=None,
        help="open-loop levels: Poisson arrivals at these requests/s, comma-separated (default none)",
    )
    p.add_argument("--requests", type=int, default=None, help="requests per level at least (default 4)")
    p.add_argument("--modes", default=None, help="outputs measured: text,text+speech,speech (default all three)")
    p.add_argument(
        "--max-tokens", dest="max_tokens", type=int, default=None, help="text tokens per reply (default 100)"
    )
    p.add_argument(
        "--speech-tokens",
        dest="speech_tokens",
        type=int,
        default=None,
        help="codec tokens per reply (default 300: 6 s of speech)",
    )
    p.add_argument(
        "--inputs",
        default=None,
        help="request i carries kind i mod n of these: text,image,audio,video (default all four)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: c=1,2, 2 requests, few tokens")
    p.add_argument("--no-plot", dest="no_plot", action="store_true")
    p.add_argument("--no-encoders", dest="no_encoders", action="store_true", help="skip the encoder batch measurement")
    _bench_load_flags(p)
    p.set_defaults(func=run_bench_command)
