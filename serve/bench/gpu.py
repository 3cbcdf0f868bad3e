"""The GPU check: Qwen2.5-Omni-7B-shaped Thinker, Talker and token2wav with random bf16 weights built on the GPU from
their config (no files, no network), measured stage by stage. It runs on a bare GPU host (torch and an older
transformers preinstalled; no Ray, av, pydantic, librosa, soundfile) from a plain checkout:

    make gpu-wheels                           # here, with network: the wheels into .gpu-wheels/ (~25 MB)
    tools/gpu_check.sh OUTDIR                 # there: installs them into a temporary site, asserts transformers
                                              # >= 5.24, runs this file as a plain script
    python serve/bench/gpu.py --out DIR [--shape 7b|tiny] [--device cuda|cpu] [--stages S0,S1,...]
    python -m omni.serve.bench.gpu --out DIR  # from an installed omni
    omni bench gpu --out DIR

`DIR/gpu_check.json` is rewritten after EACH stage (a timeout keeps what was measured); each stage runs in its own
try/except and records its error:
    S0  versions, device, free memory, SDPA backends, which omni modules import on this host
    S1  microseconds per H2D copy of one id, per `int(argmax)` sync over a vocabulary row, per pickle round-trip of a
        [H] and a [200, H] tensor (the Ray hand-off's serialization)
    S2  build (random weights, bf16 on CUDA; encoders tiny; speakers random)
    S3  Thinker decode step at batch 1/4/16/64 (128-token prompts): step, tokens/s, the roofline (LM weight bytes / HBM
        bandwidth: H100 3.35 TB/s, H200 4.8 TB/s) and the ratio; admission of a 256-token prompt into 32 x 2048 (time,
        peak memory); with omni.serve.bench.engine.run_context, the code `omni bench engine` measures with
    S4  Talker step at batch 1 and 16; token2wav's DiT on a 24- and a 48-code window at batch 1 and 16, TF32 off/on
    S5  in-process time to first audio packet at c=1 and c=16: Thinker -> Talker -> Token2Wav through the pipeline's
        own stage classes (omni.serve.stages); `omni.serve.pipeline` itself needs pydantic and yaml (its config)
Goals: the decode step at batch 1 within 1.5x of the roofline; batch 64 within 2x of batch 1; TTFAP <= 250 ms at c=1
and <= 600 ms at c=16. Random weights: no stop ids (every row decodes its full length); DiT `num_embeds` is raised to
the talker vocabulary (8448) so that any code a random talker emits is a valid DiT input.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # a plain script: python serve/bench/gpu.py
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]  # serve/bench/http.py shadows stdlib http
    sys.path.insert(0, str(_here.parents[1]))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

__all__ = ["SHAPES", "omni_config", "build", "run_check", "main", "MIN_TRANSFORMERS"]

MIN_TRANSFORMERS = (5, 24)  # Qwen3's `cache=` keyword; the project's floor
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # by device name


def _omni_importable() -> None:
    """From a bare checkout, omni.decoders / omni.serve are the top-level folders decoders/, serve/ (pyproject's
    package-dir): put the checkout root on omni's package path so they import without an install."""
    import omni

    if importlib.util.find_spec("omni.decoders") is None:
        omni.__path__.append(str(Path(omni.__path__[0]).resolve().parent))


_omni_importable()  # before the import below: a plain script finds omni.serve only through it

from omni.serve.bench.gpu_model import SHAPES, build, omni_config  # noqa: E402


# --------------------------------------------------------------------------------------------------------- helpers
def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def _us_per(fn, n: int, dev) -> float:
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / n * 1e6


def _goal(name: str, value, bound: float) -> dict:
    return {"name": name, "value": value, "bound": bound, "met": None if value is None else value <= bound}


def _no_stop(seq):
    seq.stop_ids = set()  # random weights: decode the full length
    return seq


# --------------------------------------------------------------------------------------------------------- stages
def s0_env(ctx) -> dict:
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_path": str(Path(transformers.__file__).parent),
        "cuda": torch.version.cuda,
        "device": ctx.device,
    }
    if ctx.dev.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        p = torch.cuda.get_device_properties(ctx.dev)
        out.update(
            device_name=p.name,
            capability=f"{p.major}.{p.minor}",
            free_bytes=free,
            total_bytes=total,
            sdpa={
                k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                for k in ("flash", "mem_efficient", "math", "cudnn")
                if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")
            },
        )
    imports = {}
    for mod in (
        "omni.engine",
        "omni.thinker",
        "omni.talker",
        "omni.decoders",
        "omni.serve.stages",
        "omni.serve.bench.engine",
        "omni.serve.pipeline",
    ):
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded: what this host lacks
            imports[mod] = f"{type(exc).__name__}: {exc}"
    out["imports"] = imports
    v = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    out["transformers_ok"] = v >= MIN_TRANSFORMERS
    return out


def s1_sync(ctx) -> dict:
    hidden = 3584 if ctx.shape == "7b" else 32
    vocab = 152064 if ctx.shape == "7b" else 512
    rows = SHAPES[ctx.shape]["pickle_rows"]
    dt = torch.bfloat16 if ctx.dev.type == "cuda" else torch.float32
    logits = torch.randn(1, vocab, device=ctx.dev)
    out = {
        "h2d_us": _us_per(lambda: torch.tensor([7], device=ctx.dev), 200, ctx.dev),
        "argmax_int_us": _us_per(lambda: int(logits.argmax(-1)), 200, ctx.dev),
    }
    for name, t in (
        (f"pickle_{hidden}_us", torch.randn(hidden, device=ctx.dev, dtype=dt)),
        (f"pickle_{rows}x{hidden}_us", torch.randn(rows, hidden, device=ctx.dev, dtype=dt)),
    ):
        out[name] = _us_per(lambda t=t: pickle.loads(pickle.dumps(t)), 50, ctx.dev)
    return out


def s2_build(ctx) -> dict:
    t0 = time.perf_counter()
    ctx.built = b = build(ctx.shape, ctx.device)
    _sync(ctx.dev)
    m = b.model
    lm = m.thinker.model.language_model
    # a decode step reads every LM weight once, except the embedding table (one row per row of the batch)
    ctx.lm_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n) + sum(
        p.numel() * p.element_size() for p in m.thinker.lm_head.parameters()
    )
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    out = {
        "seconds": time.perf_counter() - t0,
        "thinker_params": count(m.thinker),
        "talker_params": count(m.talker),
        "token2wav_params": count(m.token2wav),
        "lm_weight_bytes": ctx.lm_bytes,
        "engine_config": dataclasses.asdict(b.thinker.engine.config),
    }
    if ctx.dev.type == "cuda":
        out["allocated_bytes"] = torch.cuda.memory_allocated()
    return out


def s3_thinker(ctx) -> dict:
    from omni.serve.bench.engine import EngineBenchConfig, run_context

    s, th = SHAPES[ctx.shape], ctx.built.thinker
    cfg = EngineBenchConfig(steps=s["steps"], warmup=2, admit_tokens=s["admit_tokens"], admits=2)
    g = torch.Generator().manual_seed(0)
    cells = run_context(th, s["prompt"], s["batches"], cfg, g, admit=False, log=ctx.log)
    out = {"cells": [dataclasses.asdict(c) for c in cells]}
    ctx.save()
    if ctx.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    adm = run_context(th, s["admit_context"], (s["admit_rows"],), cfg, g, admit=True, log=ctx.log)[0]
    out["admission"] = dataclasses.asdict(adm)
    if ctx.dev.type == "cuda":
        out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        name = torch.cuda.get_device_properties(ctx.dev).name
        bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    else:
        bw = None
    by_b = {c.batch: c for c in cells}
    b1, bmax = by_b.get(1), by_b.get(max(by_b))
    roof = ctx.lm_bytes / bw * 1e3 if bw else None
    out.update(
        roofline_ms=roof,
        hbm_bytes_per_s=bw,
        lm_weight_bytes=ctx.lm_bytes,
        roofline_ratio=b1.step_ms_median / roof if roof and b1 else None,
    )
    ctx.goals["decode_b1_vs_roofline"] = _goal(
        "decode step at batch 1 / roofline (LM weight bytes / HBM bandwidth)", out["roofline_ratio"], 1.5
    )
    ctx.goals["decode_bmax_vs_b1"] = _goal(
        f"decode step at batch {bmax.batch} / batch 1",
        bmax.step_ms_median / b1.step_ms_median if b1 and bmax else None,
        2.0,
    )
    return out


def _talker_seq(ctx, i: int, prompt_len: int, codes: int):
    """A TalkerSequence fed a random TalkerPrompt and enough random reply vectors that it never waits."""
    from omni.talker import TalkerSequence
    from omni.types import SamplingParams, TalkerPrompt, ThinkerToTalker

    tk = ctx.built.talker
    H = ctx.built.model.thinker.config.text_config.hidden_size
    dt = tk.text_pad_embed.dtype
    seq = _no_stop(TalkerSequence(tk, f"talker{i}", "Chelsie", SamplingParams(max_tokens=codes), tk.emit_every))
    ids = torch.randint(0, 384, (prompt_len,))
    seq.feed(TalkerPrompt(ids, torch.randn(prompt_len, H, device=ctx.dev, dtype=dt), 398, None, None, None, None))
    for k in range(codes + 1):
        seq.feed(ThinkerToTalker(k, 398, torch.randn(H, device=ctx.dev, dtype=dt), last=False))
    return seq


def s4_talker_dit(ctx) -> dict:
    s, eng = SHAPES[ctx.shape], ctx.built.talker.engine
    out = {"talker": [], "dit": []}
    steps = s["steps"]
    for B in s["talker_batches"]:
        seqs = [_talker_seq(ctx, i, s["prompt"], steps + 16) for i in range(B)]
        for q in seqs:
            eng.add(q)
        while eng.num_running < B:
            eng.step()
        eng.step()
        times = []
        for _ in range(steps):
            _sync(ctx.dev)
            t0 = time.perf_counter()
            eng.step()
            _sync(ctx.dev)
            times.append(time.perf_counter() - t0)
        for q in seqs:
            q.cancel()
        while eng.num_running:
            eng.step()
        med = statistics.median(times)
        out["talker"].append({"batch": B, "step_ms_median": med * 1e3, "codes_per_s": B / med})
        ctx.log(f"  talker B={B}: {med * 1e3:.2f} ms/step")
    t2w = ctx.built.token2wav
    cond, ref = t2w._speakers["Chelsie"]
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        for n in s["dit_codes"]:
            for B in s["dit_batches"]:
                codes = torch.randint(0, 8192, (B, n), device=t2w.device)
                noise = torch.randn(B, n * t2w.repeats, t2w.mel_dim, device=t2w.device)

                def run(B=B, codes=codes, noise=noise):
                    return t2w._dit(cond.expand(B, -1), ref.expand(B, -1, -1), codes, noise)

                ms = _us_per(run, s["dit_reps"], t2w.device) / 1e3
                out["dit"].append({"tf32": tf32, "codes": n, "batch": B, "ms": ms})
                ctx.log(f"  DiT {n} codes B={B} tf32={tf32}: {ms:.1f} ms")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return out


async def _speech(ctx, stages, c: int, i0: int) -> list[dict]:
    from omni.types import AudioChunk, Generation, MediaEmbeddings, SamplingParams
    from omni.serve.bench.engine import random_prompt

    s = SHAPES[ctx.shape]
    g = torch.Generator().manual_seed(i0)
    thinker_stage, talker_stage, vocoder_stage = stages

    async def one(i: int) -> dict:
        gen = Generation(
            f"sp{i}",
            SamplingParams(max_tokens=s["text_tokens"]),
            speak=True,
            voice="Chelsie",
            talker_sampling=SamplingParams(max_tokens=s["speech_codes"]),
            vocoder_seed=i,
        )
        prompt = random_prompt(s["prompt"], 384, set(), g)
        t0 = time.perf_counter()
        first, samples = None, 0
        items = vocoder_stage.run(gen, talker_stage.run(gen, thinker_stage.run(gen, prompt, MediaEmbeddings())))
        async for item in items:
            if isinstance(item, AudioChunk) and len(item.pcm):
                first = first or time.perf_counter()
                samples += len(item.pcm)
        end = time.perf_counter()
        return {
            "ttfap_ms": None if first is None else (first - t0) * 1e3,
            "e2e_ms": (end - t0) * 1e3,
            "audio_s": samples / 24000,
        }

    return await asyncio.gather(*[one(i0 + i) for i in range(c)])


def s5_ttfap(ctx) -> dict:
    from omni.thinker import Thinker
    from omni.decoders import VocoderLoop
    from omni.serve.stages import TalkerStage, ThinkerStage, VocoderStage

    b = ctx.built
    out = {"pipeline_import": "ok"}
    try:
        importlib.import_module("omni.serve.pipeline")
    except Exception as exc:  # noqa: BLE001 - expected on a bare host (pydantic, yaml): the stages are used directly
        out["pipeline_import"] = f"{type(exc).__name__}: {exc}"

    class NoStop(Thinker.sequence_cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stop_ids = set()

    b.thinker.sequence_cls = NoStop
    talker_generate = b.talker.generate
    b.talker.generate = lambda *a, **kw: (lambda r: (_no_stop(r[0]), r[1]))(talker_generate(*a, **kw))
    stages = (ThinkerStage(b.thinker), TalkerStage(b.talker), VocoderStage(VocoderLoop(b.token2wav)))
    asyncio.run(_speech(ctx, stages, 1, 1000))  # warm-up
    out["levels"] = []
    for c in SHAPES[ctx.shape]["ttfap_c"]:
        rows = asyncio.run(_speech(ctx, stages, c, 100 * c))
        ttfap = sorted(r["ttfap_ms"] for r in rows if r["ttfap_ms"] is not None)
        lv = {
            "c": c,
            "ttfap_ms_p50": statistics.median(ttfap) if ttfap else None,
            "ttfap_ms_max": max(ttfap, default=None),
            "e2e_ms_p50": statistics.median(r["e2e_ms"] for r in rows),
            "requests": rows,
        }
        out["levels"].append(lv)
        ctx.log(f"  TTFAP c={c}: p50 {lv['ttfap_ms_p50']} ms")
        ctx.goals[f"ttfap_c{c}"] = _goal(f"TTFAP p50 at c={c} (ms)", lv["ttfap_ms_p50"], 250.0 if c == 1 else 600.0)
        ctx.save()
    return out


STAGES = {"S0": s0_env, "S1": s1_sync, "S2": s2_build, "S3": s3_thinker, "S4": s4_talker_dit, "S5": s5_ttfap}
NEEDS_BUILD = {"S3", "S4", "S5"}


class _Context:
    def __init__(self, shape: str, device: str, out: Path):
        self.shape, self.device, self.dev, self.out = shape, device, torch.device(device), out
        self.built, self.lm_bytes, self.goals = None, None, {}
        self.report = {"shape": shape, "device": device, "stages": {}, "goals": self.goals}

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def save(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")


def run_check(shape: str = "7b", device: str | None = None, out: str = "out/gpu-check", stages=None) -> dict:
    _omni_importable()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    ctx = _Context(shape, device, outdir)
    for name in stages or STAGES:
        rec = ctx.report["stages"][name] = {"status": "running"}
        ctx.save()
        ctx.log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            if name in NEEDS_BUILD and ctx.built is None:
                raise RuntimeError("S2 (build) did not succeed")
            rec.update(STAGES[name](ctx))
            rec["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded; the next stage still runs
            rec.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
            ctx.log(f"{name} failed: {rec['error']}")
        rec["seconds"] = time.perf_counter() - t0
        ctx.save()
        if name == "S0" and not rec.get("transformers_ok", True):
            rec.update(
                status="error",
                error=f"transformers {rec.get('transformers')} < "
                f"{'.'.join(map(str, MIN_TRANSFORMERS))}: carry the wheels "
                f"(make gpu-wheels) and run tools/gpu_check.sh",
            )
            ctx.save()
            raise SystemExit(f"gpu check: {rec['error']}")
    return ctx.report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omni bench gpu", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return ap


def add_arguments(ap) -> None:
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES), help="7b (the check) or tiny (a dry run)")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")


def main(args=None) -> int:
    if args is None or isinstance(args, list):
        ap = parser()
        ap.add_argument("--out", default="out/gpu-check")
        args = ap.parse_args(args)
    stages = [x.strip() for x in args.stages.split(",")] if getattr(args, "stages", None) else None
    report = run_check(args.shape, args.device, args.out or "out/gpu-check", stages)
    failed = [k for k, v in report["stages"].items() if v.get("status") != "ok"]
    print(json.dumps({"goals": report["goals"], "failed_stages": failed}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
