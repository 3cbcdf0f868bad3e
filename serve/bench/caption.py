"""`omni bench caption`: files/s of `omni caption` (the Ray Data job) against a sequential loop over the official path
on the same files, in one run, and where the time goes per stage.

    omni bench caption --model small --files 64            # ~2-4 min on 2 CPU cores
    omni bench caption --model tiny --files 8 --max-tokens 8   # smoke run

Files: a mix made here, half drawn images (PIL), a quarter espeak-ng speech (a tone without espeak-ng), a quarter
ffmpeg test-pattern videos, each one different. Both paths caption each file with the conversation `omni chat --KIND F
PROMPT` sends (the default prompt of its media type), greedy, `max_tokens` tokens at most.
- ours: `run_caption`, end to end: Ray start, actor setup (model loads), decode tasks, batched encoders, the Thinker's
  continuous batch, rows committed to a JSONL file. Steady state: from the first actor ready to the end.
- loop: load the model once, then per file `load_file` + `reference_generate` (transformers' own `generate`), one after
  the other: what a script without this project does.
Writes `<out>/caption.json` and prints a Markdown table. Captions are compared too (greedy: they should agree).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CaptionBenchConfig", "make_files", "run_caption_bench", "markdown", "main"]


@dataclass(frozen=True)
class CaptionBenchConfig:
    model: str = "small"  # preset, checkpoint directory or hub id
    files: int = 64  # media files captioned by both paths
    max_tokens: int = 32  # caption tokens at most (greedy)
    batch_size: int = 8  # omni caption --batch-size
    concurrency: int = 1  # omni caption --concurrency
    out: str = "out/bench"  # caption.json goes here

    @classmethod
    def from_args(cls, args) -> CaptionBenchConfig:
        # --model --files --max-tokens --out; the serving bench's --concurrency (levels) means something else here
        keys = ("model", "files", "max_tokens", "out")
        kw = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
        return cls(**kw)


def make_files(folder: Path, n: int) -> list[Path]:
    """n distinct media files in `folder`: images (1/2), speech (1/4), videos (1/4)."""
    import soundfile as sf

    from omni.serve.bench.workload import drawn_image, tone

    folder.mkdir(parents=True, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    files = []
    for i in range(n):
        kind = ("image", "audio", "image", "video")[i % 4]
        if kind == "image":
            path = folder / f"image{i:03d}.png"
            drawn_image(i, size=(224 + 28 * (i % 3), 168)).save(path)
        elif kind == "audio":
            path = folder / f"speech{i:03d}.wav"
            if espeak:
                subprocess.run(
                    [espeak, "-w", str(path), f"Sample number {i}. The quick brown fox jumps over the lazy dog."],
                    check=True,
                    capture_output=True,
                )
            else:
                sf.write(path, tone(3.0, 180.0 + 10 * i), 16000)
        else:
            path = folder / f"video{i:03d}.mp4"
            pattern = ("testsrc", "testsrc2", "smptebars", "rgbtestsrc")[i // 4 % 4]
            subprocess.run(
                [
                    "ffmpeg",
                    "-loglevel",
                    "error",
                    "-y",
                    "-f",
                    "lavfi",
                    "-i",
                    f"{pattern}=size=160x120:rate=8:duration={2 + i % 2}",
                    "-vf",
                    f"hue=h={(i * 37) % 360}",
                    "-c:v",
                    "libx264",
                    "-pix_fmt",
                    "yuv420p",
                    str(path),
                ],
                check=True,
                capture_output=True,
            )
        files.append(path)
    return files


def _loop(files: list[Path], config: CaptionBenchConfig) -> dict:
    """The official path, one file after the other."""
    from omni.checkpoint import load_model
    from omni.reference import reference_generate
    from omni.serve.caption_io import DEFAULT_PROMPTS, caption_request, load_file

    t0 = time.perf_counter()
    loaded = load_model(config.model, device="cpu")
    load_s = time.perf_counter() - t0
    captions, decode_s, generate_s = {}, 0.0, 0.0
    for i, f in enumerate(files):
        t1 = time.perf_counter()
        kind, media = load_file(str(f))
        t2 = time.perf_counter()
        ref = reference_generate(loaded, caption_request(kind, media, DEFAULT_PROMPTS[kind], config.max_tokens))
        t3 = time.perf_counter()
        decode_s, generate_s = decode_s + t2 - t1, generate_s + t3 - t2
        captions[str(f.resolve())] = ref.text
        print(f"[bench caption] loop: {i + 1}/{len(files)} files", end="\r", flush=True)
    print()
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "files_per_s": len(files) / wall,
        "files_per_s_after_load": len(files) / (wall - load_s),
        "stage_s": {"model load": load_s, "decode": decode_s, "generate (processor + encoders + LM)": generate_s},
        "captions": captions,
    }


def _ours(files: list[Path], folder: Path, config: CaptionBenchConfig) -> dict:
    from omni.serve.caption_output import CaptionOutput
    from omni.serve.cluster.caption import CaptionOptions, run_caption

    out = folder.parent / "captions.jsonl"
    opts = CaptionOptions(
        model=config.model, max_tokens=config.max_tokens, batch_size=config.batch_size, concurrency=config.concurrency
    )
    report = run_caption([str(f) for f in files], str(out), opts, progress_every_s=5.0)
    rows = CaptionOutput(str(out)).read()
    t = report.timeline
    ready = max(t.get("encode_ready", 0.0), t.get("thinker_ready", 0.0))
    return {
        "wall_s": report.seconds,
        "files_per_s": report.files_per_s,
        "files_per_s_after_startup": report.files / max(report.seconds - ready, 1e-9),
        "ok": report.ok,
        "failed": report.failed,
        "timeline_s": t,
        "stage_s": {
            "decode (read, decode, processor)": report.stage_seconds["decode"],
            "encode (towers, batched)": report.stage_seconds["encode"],
            "thinker (continuous batch)": report.stage_seconds["thinker"],
        },
        "captions": {r["path"]: r["caption"] for r in rows},
    }


def run_caption_bench(config: CaptionBenchConfig) -> dict:
    import os
    import platform

    from omni.checkpoint import resolve_model

    resolve_model(config.model)  # a preset is built on first use: not part of either measurement
    tmp = Path(tempfile.mkdtemp(prefix="omni-bench-caption-"))
    try:
        t0 = time.perf_counter()
        files = make_files(tmp / "media", config.files)
        print(f"[bench caption] made {len(files)} files in {time.perf_counter() - t0:.1f}s", flush=True)
        ours = _ours(files, tmp / "media", config)
        loop = _loop(files, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = sum(ours["captions"].get(p) == c for p, c in loop["captions"].items())
    for side in (ours, loop):
        del side["captions"]
    return {
        "config": asdict(config),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "ours": ours,
        "loop": loop,
        "ratio": ours["files_per_s"] / loop["files_per_s"],
        "ratio_steady": ours["files_per_s_after_startup"] / loop["files_per_s_after_load"],
        "captions_equal": same,
        "files": len(files),
    }


def markdown(r: dict) -> str:
    o, lp, c = r["ours"], r["loop"], r["config"]
    lines = [
        f"## omni caption vs a sequential loop over the official path ({c['model']}, {r['files']} files, "
        f"max_tokens {c['max_tokens']}, {r['cpu_cores']} CPU cores)",
        "",
        "| | omni caption | official loop | ratio |",
        "|---|---|---|---|",
        f"| files/s, end to end (Ray start + model loads included) | {o['files_per_s']:.2f} | "
        f"{lp['files_per_s']:.2f} | **{r['ratio']:.2f}x** |",
        f"| files/s after startup (actors ready / model loaded) | {o['files_per_s_after_startup']:.2f} | "
        f"{lp['files_per_s_after_load']:.2f} | {r['ratio_steady']:.2f}x |",
        f"| wall seconds | {o['wall_s']:.1f} | {lp['wall_s']:.1f} | |",
        f"| captions equal to the official path's | {r['captions_equal']}/{r['files']} | | |",
        "",
        "Where the time goes (seconds; omni caption's stages are summed per file and overlap each other):",
        "",
    ]
    lines += [f"- omni caption, {k}: {v:.1f}" for k, v in o["stage_s"].items()]
    t = o["timeline_s"]
    lines.append("- omni caption, timeline from the start: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    lines += [f"- loop, {k}: {v:.1f}" for k, v in lp["stage_s"].items()]
    return "\n".join(lines)


def main(args) -> int:
    config = CaptionBenchConfig.from_args(args)
    from omni.serve.bench.results import save_and_print

    results = run_caption_bench(config)
    return save_and_print(config.out, "caption.json", results, markdown(results))
