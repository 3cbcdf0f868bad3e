"""`omni bench engine`: the decode engine alone (omni/engine.py under the Thinker), driven directly with random-id
prompts, greedy, no stop id (every row decodes for as long as it is measured):

    omni bench engine --model small                                   # ~2 min on 2 CPU cores
    omni bench engine --model tiny --batches 1,2 --contexts 16,32 --steps 2 --admit-tokens 8   # smoke run

Per cell (batch B x context T: B prompts of T tokens prefilled, then `steps` decode steps timed one by one, fewer past
3 once they took `cell_seconds`, which keeps the CPU's 32 x 2048 cell short):
- the decode step's time (median) and tokens/s (B / step);
- memory per steady-state step: on CUDA the `torch.cuda.memory_allocated` delta and the peak above the step's start
  (`max_memory_allocated`); on the CPU the bytes allocated during one step and the peak above its start, from the
  allocator events `torch.profiler` records with `profile_memory=True` (see `cpu_step_memory`);
- admission: the step that admits one new `admit_tokens` prompt into the running B x T batch (its time, median of
  `admits`; its extra over the cell's plain step = the admission cost; its peak memory); the admitted row is
  cancelled and retired after each.
Within one context the batches grow (1 -> 8 -> 32 rows: the rows already there stay), so a row's context is its prompt
plus the few steps of the cells before: T is the prompt length.

Goals (met / not met, each with its measured ratio):
- admission: the admission cost into the largest cell (32 x 2048) within 1.5x of the smallest (1 x 256);
- context: at `goal_batch` (8) rows, the step at ~1500-token contexts within 1.5x of ~100 tokens;
- allocation: at `goal_batch` rows, the bytes allocated per step at ~1500 tokens within 1.5x of ~100 (it must not grow
  with batch x context, as a KV cache that is copied or grown each step does).
Writes `<out>/engine.json` and `<out>/engine.md`; prints the Markdown. Works with the EngineConfig of before and after
the slot-cache rewrite: fields it lacks (`kv_cache_tokens`, `compile`) are left out and listed in the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "EngineBenchConfig",
    "Goal",
    "CellResult",
    "engine_config",
    "random_prompt",
    "bench_sequence",
    "cpu_step_memory",
    "step_memory",
    "run_context",
    "run_engine_bench",
    "goals",
    "markdown",
    "main",
]


def _ints(text) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(",") if x.strip())


@dataclass(frozen=True)
class EngineBenchConfig:
    model: str = "small"  # preset, checkpoint directory or hub id
    batches: tuple[int, ...] = (1, 8, 32)  # rows in the running batch
    contexts: tuple[int, ...] = (256, 2048)  # prompt tokens per row
    steps: int = 6  # decode steps timed per cell (one by one; the median is reported)
    cell_seconds: float = 8.0  # ... but past 3 steps, no more once they took this long (the CPU's 32 x 2048 cell)
    warmup: int = 2  # decode steps before them
    admit_tokens: int = 256  # the admitted prompt's length
    admits: int = 2  # admissions timed per cell (the median is reported)
    goal_batch: int = 8  # rows of the context and allocation goals
    goal_contexts: tuple[int, ...] = (100, 1500)  # their short and long contexts
    compile: bool = False  # EngineConfig.compile, where the engine has it
    threads: Optional[int] = None  # torch threads on a CPU (default: the pipeline's, cores // 3, at least 1: spinning
    #                                OpenMP threads on shared cores make steps 10-100x slower)
    device: Optional[str] = None  # default: cuda if available
    out: str = "out/bench-engine"

    @classmethod
    def from_args(cls, args) -> EngineBenchConfig:
        kw = {}
        for k in ("model", "steps", "warmup", "admit_tokens", "admits", "goal_batch", "threads", "device", "out"):
            if getattr(args, k, None) is not None:
                kw[k] = getattr(args, k)
        for k in ("batches", "contexts", "goal_contexts"):
            if getattr(args, k, None):
                kw[k] = _ints(getattr(args, k))
        if getattr(args, "compile", False):
            kw["compile"] = True
        return cls(**kw)


@dataclass(frozen=True)
class Goal:
    name: str
    value: Optional[float]  # the measured ratio; None when the run lacks the cells
    bound: float  # met when value <= bound
    detail: str = ""

    @property
    def met(self) -> Optional[bool]:
        return None if self.value is None else self.value <= self.bound

    def to_json(self) -> dict:
        return {**asdict(self), "met": self.met}


@dataclass
class CellResult:
    batch: int  # rows decoding (asked for)
    context: int  # prompt tokens per row
    rows_seen: int  # rows the engine held while timed (engine.num_running): == batch unless a row ended
    fill_s: float  # the steps that prefilled the rows added for this cell
    step_ms: list  # each timed decode step
    step_ms_median: float
    step_ms_min: float
    tokens_per_s: float  # batch / median step
    step_alloc_bytes: Optional[int]  # bytes allocated during one steady-state step (CPU: sum of allocations; CUDA:
    #                                  memory_allocated after - before, what the step leaves allocated)
    step_peak_bytes: Optional[int]  # the step's peak above its start
    admit_step_ms: Optional[float] = None  # the step that admits one `admit_tokens` prompt (prefill + decode)
    admit_extra_ms: Optional[float] = None  # that step minus a plain step of this cell: the admission cost
    admit_peak_bytes: Optional[int] = None  # peak memory above the admitting step's start


def engine_config(**fields):
    """EngineConfig from the fields this engine has; -> (config, names left out). Before the slot-cache rewrite
    `kv_cache_tokens` and `compile` do not exist."""
    from omni.engine import EngineConfig

    have = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in fields.items() if k in have}), sorted(set(fields) - have)


def random_prompt(length: int, vocab: int, avoid: set[int], generator: torch.Generator):
    """A text-only PreparedPrompt of `length` random ids in [0, vocab) outside `avoid` (media placeholders)."""
    from omni.types import PreparedPrompt

    ids = torch.randint(0, vocab, (length,), generator=generator)
    for a in avoid:
        ids[ids == a] = (a + 1) % vocab if (a + 1) % vocab not in avoid else 0
    return PreparedPrompt(input_ids=ids, images=[], videos=[], audios=[], video_second_per_grid=None)


def bench_sequence(thinker, request_id: str, prompt, max_tokens: int):
    """The Thinker's own sequence, greedy, with no stop id: it decodes until max_tokens or cancelled."""
    from omni.types import MediaEmbeddings, SamplingParams

    seq = thinker.sequence_cls(
        thinker, request_id, prompt, MediaEmbeddings(), SamplingParams(max_tokens=max_tokens), False
    )
    seq.stop_ids = set()
    return seq


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def cpu_step_memory(fn: Callable) -> tuple[int, int]:
    """Run fn under torch.profiler(profile_memory=True) -> (bytes allocated on the CPU during it, the peak above its
    start). From the allocator's "[memory]" events of the trace (each: Bytes, +alloc / -free, and Total Allocated
    after it); tests/serve/bench/test_bench_engine.py checks it against tensors of known size."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    finally:
        os.unlink(path)
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and int(e.get("args", {}).get("Device Type", 0)) == 0),
        key=lambda e: e.get("ts", 0),
    )
    if not mem:
        return 0, 0
    sizes = [int(e["args"]["Bytes"]) for e in mem]
    totals = [int(e["args"]["Total Allocated"]) for e in mem]
    start = totals[0] - sizes[0]
    return sum(b for b in sizes if b > 0), max(0, max(totals) - start)


def step_memory(fn: Callable, device) -> tuple[int, int]:
    """(bytes allocated by one call of fn, its peak above its start): CUDA allocator counters or the CPU profiler."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_step_memory(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) - before, torch.cuda.max_memory_allocated(device) - before


def _check(seqs) -> None:
    """A sequence whose prefill failed holds its exception in its outbox (and no row): the cell would be wrong."""
    for s in seqs:
        exc = next((x for x in s.outbox if isinstance(x, Exception)), None)
        if exc is not None or (s.finished and not s.cancelled):
            raise RuntimeError(f"bench sequence {s.request_id} ended early: {exc!r}")


def _fill(engine, rows: int, max_steps: int = 64) -> None:
    """Step until `rows` sequences hold a slot (prefills done; each admitting step decodes too)."""
    for _ in range(max_steps):
        engine.step()
        if engine.num_running >= rows:
            return
    raise RuntimeError(f"the engine holds {engine.num_running} rows after {max_steps} steps, wanted {rows}")


def run_context(
    thinker, context: int, batches, cfg: EngineBenchConfig, generator: torch.Generator, admit: bool = True, log=print
) -> list[CellResult]:
    """Grow one running batch of `context`-token prompts through `batches` (ascending) and measure each cell."""
    engine, device = thinker.engine, thinker.device
    vocab = thinker.cfg.text_config.vocab_size
    avoid = {thinker.cfg.audio_token_id, thinker.cfg.image_token_id, thinker.cfg.video_token_id}
    max_tokens = len(batches) * (cfg.warmup + cfg.steps + 2 * cfg.admits + 8) + 64
    live, out = [], []

    def admit_one(tag: str, measure: Callable):
        """Add one `admit_tokens` prompt, run the admitting step through `measure`, then retire the row."""
        new = bench_sequence(
            thinker, f"c{context}-{tag}", random_prompt(cfg.admit_tokens, vocab, avoid, generator), max_tokens
        )
        engine.add(new)
        result = measure(engine.step)
        _check([new])
        new.cancel()
        engine.step()  # retires the admitted row
        return result

    for B in sorted(batches):
        t0 = time.perf_counter()
        for _ in range(B - len(live)):
            seq = bench_sequence(
                thinker, f"c{context}-r{len(live)}", random_prompt(context, vocab, avoid, generator), max_tokens
            )
            live.append(seq)
            engine.add(seq)
        _fill(engine, B)
        fill_s = time.perf_counter() - t0
        if admit and not out:  # the first prefill of the admitted length: kernel selection, caches (not timed)
            admit_one("warm", lambda step: step())
        for _ in range(cfg.warmup):
            engine.step()
        times = []
        while len(times) < cfg.steps and (len(times) < 3 or sum(times) < cfg.cell_seconds):
            times.append(_timed(engine.step, device))
        _check(live)
        rows = engine.num_running
        med = statistics.median(times)
        cell = CellResult(
            B, context, rows, fill_s, [t * 1e3 for t in times], med * 1e3, min(times) * 1e3, B / med, None, None
        )
        if admit:
            if device.type == "cuda":  # the allocator counters cost nothing: time and memory in the same step

                def measure(step):
                    t = time.perf_counter()
                    peak = step_memory(step, device)[1]
                    return time.perf_counter() - t, peak

                got = [admit_one(f"admit{B}-{i}", measure) for i in range(cfg.admits)]
                t_admit, cell.admit_peak_bytes = statistics.median(t for t, _ in got), max(p for _, p in got)
            else:  # the profiler slows the step: time the admissions, profile one more
                t_admit = statistics.median(
                    admit_one(f"admit{B}-{i}", lambda step: _timed(step, device)) for i in range(cfg.admits)
                )
                cell.admit_peak_bytes = admit_one(f"admit{B}b", cpu_step_memory)[1]
            cell.admit_step_ms = t_admit * 1e3
            cell.admit_extra_ms = (t_admit - med) * 1e3
        cell.step_alloc_bytes, cell.step_peak_bytes = step_memory(engine.step, device)
        if engine.num_running != B:
            raise RuntimeError(f"{engine.num_running} rows after cell {B} x {context}, expected {B}")
        log(
            f"  B={B:3d} T={context:5d}  step {cell.step_ms_median:8.2f} ms  {cell.tokens_per_s:8.1f} tok/s  "
            f"alloc/step {_mib(cell.step_alloc_bytes)}  peak {_mib(cell.step_peak_bytes)}"
            + (
                f"  admit {cell.admit_step_ms:8.2f} ms (+{cell.admit_extra_ms:.2f})  peak {_mib(cell.admit_peak_bytes)}"
                if admit
                else ""
            )
        )
        out.append(cell)
    for s in live:
        s.cancel()
    while engine.num_running:
        engine.step()
    return out


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:8.2f} MiB"


def _thinker(loaded, cfg: EngineBenchConfig, rows: int, context: int):
    from omni.serve.models import thinker_of

    kv = rows * (context + cfg.admit_tokens + 512)
    ec, missing = engine_config(
        max_num_seqs=rows + 1, max_prefill_tokens=0, prefill_chunk_tokens=0, kv_cache_tokens=kv, compile=cfg.compile
    )
    return thinker_of(loaded, ec, max_model_len=context + cfg.admit_tokens + 1024), ec, missing


def run_engine_bench(cfg: EngineBenchConfig, loaded=None, log=print) -> dict:
    """Every cell of the grid, the goal cells, the goals -> the JSON report (a dict)."""
    from omni.checkpoint import load_model

    loaded = loaded or load_model(cfg.model, device=cfg.device)
    if loaded.device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // 3))
    g = torch.Generator().manual_seed(0)
    cells, goal_cells, ec, missing, stats = [], [], None, [], {}
    for T in sorted(cfg.contexts):
        thinker, ec, missing = _thinker(loaded, cfg, max(cfg.batches), T)
        cells += run_context(thinker, T, cfg.batches, cfg, g, log=log)
        stats[f"T={T}"] = thinker.engine.stats()
    for T in sorted(cfg.goal_contexts):
        thinker, _, _ = _thinker(loaded, cfg, cfg.goal_batch, T)
        goal_cells += run_context(thinker, T, (cfg.goal_batch,), cfg, g, admit=False, log=log)
        stats[f"goal T={T}"] = thinker.engine.stats()
    report = {
        "config": asdict(cfg),
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()),
        "engine_config": asdict(ec),
        "engine_fields_missing": missing,
        "engine_stats": stats,
        "cells": [asdict(c) for c in cells],
        "goal_cells": [asdict(c) for c in goal_cells],
    }
    report["goals"] = [x.to_json() for x in goals(cells, goal_cells, cfg)]
    return report


def _ratio(a, b) -> Optional[float]:
    return None if a is None or b is None or b <= 0 else a / b


def goals(cells: list[CellResult], goal_cells: list[CellResult], cfg: EngineBenchConfig) -> list[Goal]:
    out = []
    adm = [c for c in cells if c.admit_extra_ms is not None]
    if adm:
        lo = min(adm, key=lambda c: (c.batch * c.context, c.batch))
        hi = max(adm, key=lambda c: (c.batch * c.context, c.batch))
        # the cost can be ~0 on a small cell: floor the denominator at 1% of its plain step
        base = max(lo.admit_extra_ms, 0.01 * lo.step_ms_median)
        out.append(
            Goal(
                f"admission cost ({cfg.admit_tokens}-token prompt) into {hi.batch} x {hi.context} / into "
                f"{lo.batch} x {lo.context}",
                _ratio(max(hi.admit_extra_ms, 0.0), base),
                1.5,
                f"extra over a plain step {hi.admit_extra_ms:.2f} vs {lo.admit_extra_ms:.2f} ms; whole "
                f"admitting step {hi.admit_step_ms:.2f} vs {lo.admit_step_ms:.2f} ms "
                f"({_ratio(hi.admit_step_ms, lo.admit_step_ms):.2f}x)",
            )
        )
    else:
        out.append(Goal("admission cost, largest cell / smallest", None, 1.5, "no cell measured admission"))
    short = min(goal_cells, key=lambda c: c.context, default=None)
    long = max(goal_cells, key=lambda c: c.context, default=None)
    same = short is not None and long is not short
    out.append(
        Goal(
            f"step at {cfg.goal_batch} rows: {long.context if same else '?'}-token contexts / "
            f"{short.context if same else '?'}",
            _ratio(long.step_ms_median, short.step_ms_median) if same else None,
            1.5,
            f"{long.step_ms_median:.2f} vs {short.step_ms_median:.2f} ms" if same else "needs two contexts",
        )
    )
    out.append(
        Goal(
            f"bytes allocated per step at {cfg.goal_batch} rows: {long.context if same else '?'}-token "
            f"contexts / {short.context if same else '?'}",
            _ratio(long.step_alloc_bytes, short.step_alloc_bytes) if same else None,
            1.5,
            f"{_mib(long.step_alloc_bytes).strip()} vs {_mib(short.step_alloc_bytes).strip()}"
            if same
            else "needs two contexts",
        )
    )
    return out


def _met(g: dict) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[g["met"]]


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"`omni bench engine --model {report['model']}` on {report['device']} ({report['dtype']}, torch "
        f"{report['torch']}): random-id prompts, greedy, {cfg['steps']} timed decode steps per cell (median).",
        "",
        "| rows | context | step | tokens/s | alloc/step | step peak | admit step | admission cost | admit peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, unit="ms"):
        if v is None:
            return "-"
        return f"{v:.2f} ms" if unit == "ms" else f"{v / 2**20:.2f} MiB"

    for c in report["cells"] + report["goal_cells"]:
        lines.append(
            f"| {c['batch']} | {c['context']} | {fmt(c['step_ms_median'])} | {c['tokens_per_s']:.1f} | "
            f"{fmt(c['step_alloc_bytes'], 'b')} | {fmt(c['step_peak_bytes'], 'b')} | "
            f"{fmt(c['admit_step_ms'])} | {fmt(c['admit_extra_ms'])} | {fmt(c['admit_peak_bytes'], 'b')} |"
        )
    lines += ["", "| goal | measured | bound | verdict | detail |", "|---|---|---|---|---|"]
    for g in report["goals"]:
        v = "-" if g["value"] is None else f"{g['value']:.2f}x"
        lines.append(f"| {g['name']} | {v} | {g['bound']}x | {_met(g)} | {g['detail']} |")
    if report["engine_fields_missing"]:
        lines += [
            "",
            f"EngineConfig without {', '.join(report['engine_fields_missing'])} (the engine before the "
            f"slot-cache rewrite): left out.",
        ]
    return "\n".join(lines)


def main(args) -> int:
    cfg = EngineBenchConfig.from_args(args)
    from omni.checkpoint import load_model

    loaded = load_model(cfg.model, device=cfg.device)
    print(
        f"omni bench engine: {cfg.model} on {loaded.device}, batches {cfg.batches}, contexts {cfg.contexts}, "
        f"goal cells {cfg.goal_batch} x {cfg.goal_contexts}"
    )
    t0 = time.perf_counter()
    report = run_engine_bench(cfg, loaded)
    report["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "engine.md").write_text(md + "\n")
    print(md)
    return 0
