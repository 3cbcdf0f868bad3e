"""`omni caption`: batch media captioning as a Ray Data pipeline, resumable and fault tolerant.

    list (driver) -> read + sniff + decode + prompt (parallel tasks) -> encoders (actor pool, batched forwards)
        -> Thinker (actor pool, each a continuous-batching engine fed a whole batch at once) -> write (driver)

The driver lists the files, drops those already in the output (--resume), and consumes the dataset's blocks as they
complete, committing each block's rows to the output (serve/caption_io.py) before taking the next: an interrupt loses
at most the rows in flight. A file that cannot be read or decoded is a row with `error` set from the first stage on;
later stages pass such rows through, so every input file gives exactly one row. Ray Data restarts a killed actor and
retries its tasks, so a killed worker costs time, not rows.

What crosses a stage boundary is arrow-friendly: strings, numbers and one binary column. `payload` holds a pickled
PreparedPrompt after decoding (token ids [L], per-item pixel patches / Whisper features, torch tensors), then a
pickled (PreparedPrompt, MediaEmbeddings) after the encoders (embeddings [n_tokens, H] per item); the Thinker stage
drops it, so only rows travel back to the driver (plus 16-bit PCM in `speech` with --speak).

Runs where Ray runs: a local Ray started here, or the cluster in RAY_ADDRESS. `encoder_resources` /
`thinker_resources` (custom Ray resources) pin each actor pool to the nodes that have them.
"""
from __future__ import annotations

import asyncio
import functools
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from omni.thinker import Thinker, ThinkerDone
from omni.types import TextDelta
from omni.serve.caption_io import (DEFAULT_PROMPTS, CaptionError, CaptionOutput, InputFile, Progress,
                                   caption_request, list_inputs, load_file, one_line)

__all__ = ["CaptionOptions", "CaptionReport", "run_caption", "decode_batch", "EncoderStage", "ThinkerStage"]

STAGES = ("decode", "encode", "thinker")


@dataclass(frozen=True)
class CaptionOptions:
    model: str = "tiny"  # preset (tiny, small), checkpoint directory or hub id
    prompt: Optional[str] = None  # one prompt for every file; None: DEFAULT_PROMPTS by media type
    max_tokens: int = 128  # caption tokens at most (greedy, as `omni chat`)
    batch_size: int = 8  # files per call of an encoder or Thinker actor
    concurrency: int = 1  # actors per model stage: the encoder pool and the Thinker pool each get this many
    use_audio_in_video: bool = False  # a video's own audio track goes in with its frames
    speak_dir: Optional[str] = None  # write <speak_dir>/<relative path>.wav (24 kHz) through the Talker + vocoder
    voice: str = "Chelsie"  # speaker for --speak
    max_speech_tokens: int = 1024  # codec tokens per file at most with --speak (50 per second)
    device: str = "cpu"  # the model stages' torch device ("cuda" on GPU nodes)
    decode_tasks: int = 2  # read/decode tasks running at once
    decode_cpus: float = 0.25  # Ray CPUs per decode task (fractional: 2-core machines)
    encoder_cpus: float = 0.25  # Ray CPUs per encoder actor
    thinker_cpus: float = 0.5  # Ray CPUs per Thinker actor
    gpus_per_actor: float = 0.0  # Ray GPUs per encoder / Thinker actor (0.5 each: both stages on one GPU)
    thinker_threads: Optional[int] = None  # torch threads of a Thinker actor on CPU; None: max(1, cores // 2)
    thinker_calls: int = 4  # batches one Thinker actor runs at once: its engine keeps rows of several batches
    max_num_seqs: int = 64  # rows of a Thinker actor's running batch
    encoder_resources: dict = field(default_factory=dict)  # custom Ray resources per encoder actor ({"enc": 1})
    thinker_resources: dict = field(default_factory=dict)  # custom Ray resources per Thinker actor

    def __post_init__(self):
        if self.max_tokens < 1 or self.batch_size < 1 or self.concurrency < 1 or self.decode_tasks < 1:
            raise CaptionError("--max-tokens, --batch-size, --concurrency and decode_tasks must be >= 1")

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device.startswith("cuda") else "float32"


@dataclass
class CaptionReport:
    out: str  # the output file
    files: int  # files this run captioned (rows written)
    ok: int  # ... without error
    failed: int  # ... with error
    skipped: int  # already in the output (resume)
    seconds: float  # wall time of the pipeline, Ray start and model loading included
    files_per_s: float  # files / seconds
    stage_seconds: dict  # {stage: summed per-file seconds}: where the time goes
    nodes: dict  # {stage: sorted Ray node ids that ran it}
    interrupted: int = 0  # the signal that stopped the job before the end (SIGINT 2, SIGTERM 15); 0: it ran to the end
    thinker_pids: list = field(default_factory=list)  # worker processes of the Thinker actors (tests kill one)
    timeline: dict = field(default_factory=dict)  # seconds from the start: ray (Ray up), encode_ready /
    #                                               thinker_ready (first actor of the stage set up), first_row, end


# ---------------------------------------------------------------------------------------------------- stage 1: decode
@functools.lru_cache(maxsize=2)
def _processor(model: str):
    from transformers import AutoProcessor

    from omni.checkpoint import resolve_model

    return AutoProcessor.from_pretrained(resolve_model(model))


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def decode_batch(batch: dict, opts: CaptionOptions) -> dict:
    """Read, sniff, decode and build the prompt of each file; a file that fails becomes an error row here.
    batch: {path: [n] str, rel: [n] str} -> + media_type, prompt, error, payload (pickled PreparedPrompt), timing."""
    from omni.prompt import prepare_prompt

    _set_threads(1)
    processor, node = _processor(opts.model), _node()
    out = {k: [] for k in ("path", "rel", "media_type", "prompt", "error", "payload", "decode_s", "decode_node")}
    for path, rel in zip(batch["path"], batch["rel"]):
        t0 = time.perf_counter()
        kind, prompt, error, payload = "", opts.prompt or "", "", b""  # "" for none: an all-None column is no string
        try:
            kind, media = load_file(str(path), opts.use_audio_in_video)
            prompt = opts.prompt or DEFAULT_PROMPTS[kind]
            request = caption_request(kind, media, prompt, opts.max_tokens, opts.use_audio_in_video,
                                      speak=opts.speak_dir is not None, voice=opts.voice,
                                      max_speech_tokens=opts.max_speech_tokens)
            payload = pickle.dumps(prepare_prompt(processor, request))
        except Exception as e:  # noqa: BLE001 - per file: whatever a decoder raises on bad bytes is that file's error
            kind = getattr(e, "media_type", kind) or ""
            prompt = opts.prompt or DEFAULT_PROMPTS.get(kind, "")
            error = one_line(e) if str(e) else type(e).__name__
        for k, v in (("path", str(path)), ("rel", str(rel)), ("media_type", kind), ("prompt", prompt),
                     ("error", error), ("payload", payload), ("decode_s", time.perf_counter() - t0),
                     ("decode_node", node)):
            out[k].append(v)
    return {k: np.array(v, dtype=object) if k != "decode_s" else np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- stage 2: encode
class EncoderStage:
    """The vision and audio towers (one thinker load), batched: all images of a batch in one call, all videos in one,
    all audios in one. If a batched call fails, its rows are redone one by one, so only the culprit errs."""

    def __init__(self, opts: CaptionOptions):
        from omni.encoders import EncoderConfig, VideoEncoder

        if not opts.device.startswith("cuda"):
            _set_threads(max(1, int(opts.encoder_cpus)))
        towers = VideoEncoder.from_pretrained(opts.model, EncoderConfig(device=opts.device, dtype=opts.dtype,
                                                                         max_batch_items=max(16, opts.batch_size)))
        self.vision, self.audio, self.node = towers.vision, towers.audio, _node()
        self.ready_at = time.time()  # wall clock when this actor was set up (process started, model loaded)

    def _encode(self, prompts: list) -> list:
        """[PreparedPrompt] -> [MediaEmbeddings], three batched calls in all."""
        from omni.types import MediaEmbeddings

        images = self.vision.encode([it for p in prompts for it in p.images])
        videos = self.vision.encode([it for p in prompts for it in p.videos])
        audios = self.audio.encode([it for p in prompts for it in p.audios])
        out, i, v, a = [], 0, 0, 0
        for p in prompts:
            ni, nv, na = len(p.images), len(p.videos), len(p.audios)
            out.append(MediaEmbeddings(images[i:i + ni], videos[v:v + nv], audios[a:a + na]))
            i, v, a = i + ni, v + nv, a + na
        return out

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        n = len(batch["path"])
        todo = [j for j in range(n) if not batch["error"][j]]
        prompts = {j: pickle.loads(batch["payload"][j]) for j in todo}
        errors = list(batch["error"])
        payload = list(batch["payload"])
        try:
            media = dict(zip(todo, self._encode([prompts[j] for j in todo])))
        except Exception:  # noqa: BLE001 - find the row that fails, keep the others
            media = {}
            for j in todo:
                try:
                    media[j] = self._encode([prompts[j]])[0]
                except Exception as e:  # noqa: BLE001
                    errors[j] = one_line(f"encoder failed: {type(e).__name__}: {e}")
        for j in todo:
            payload[j] = pickle.dumps((prompts[j], media[j])) if j in media else b""
        per_file = (time.perf_counter() - t0) / max(1, len(todo))
        return {**batch, "error": np.array(errors, dtype=object), "payload": np.array(payload, dtype=object),
                "encode_s": np.array([per_file if j in media else 0.0 for j in range(n)]),
                "encode_node": np.array([self.node] * n, dtype=object),
                "encode_ready_at": np.array([self.ready_at] * n)}


# ---------------------------------------------------------------------------------------------------- stage 3: Thinker
class ThinkerStage:
    """The Thinker's continuous-batching engine: every row of a batch (and of up to `thinker_calls` batches at once)
    joins one running batch, one batched forward per decode step. With speak_dir, the Talker and the vocoder run in
    the same actor (the hand-offs stay in process) and each row carries its speech as 16-bit PCM."""

    def __init__(self, opts: CaptionOptions):
        from omni.checkpoint import resolve_model
        from omni.engine import EngineConfig

        self.opts = opts
        ec = EngineConfig(max_num_seqs=opts.max_num_seqs)
        if opts.speak_dir is not None:
            from omni.checkpoint import load_model
            from omni.serve.pipeline import Pipeline, PipelineConfig

            self.pipeline = Pipeline(load_model(opts.model, device=opts.device, dtype=opts.dtype),
                                     PipelineConfig(thinker=ec))
            self.thinker = self.pipeline.thinker
        else:
            import torch
            from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

            path = resolve_model(opts.model)
            net = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, opts.dtype))
            self.thinker = Thinker(net.to(opts.device).eval(), AutoTokenizer.from_pretrained(path), ec)
        if not opts.device.startswith("cuda"):
            _set_threads(opts.thinker_threads or max(1, (os.cpu_count() or 2) // 2))
        self.node, self.pid = _node(), os.getpid()
        self.ready_at = time.time()

    async def _one(self, path: str, prompt, media) -> tuple[str, int, bytes]:
        """-> (caption, generated tokens, speech as 16-bit PCM or b"")."""
        from omni.types import SamplingParams

        o = self.opts
        rid = f"caption-{os.getpid()}-{time.monotonic_ns()}-{path}"
        sampling = SamplingParams(max_tokens=o.max_tokens)
        if o.speak_dir is None:
            text, n = [], 0
            async for item in self.thinker.generate(rid, prompt, media, sampling):
                if isinstance(item, TextDelta):
                    text.append(item.text)
                elif isinstance(item, ThinkerDone):
                    n = len(item.token_ids)
            return "".join(text), n, b""
        return await self._speak(rid, prompt, media, sampling)

    async def _speak(self, rid: str, prompt, media, sampling) -> tuple[str, int, bytes]:
        from omni.serve.api.audio_io import pcm16_bytes
        from omni.serve.pipeline import finish
        from omni.serve.stages import talker_stream, vocoder_stream
        from omni.types import AudioChunk, Finished, SamplingParams

        p, o = self.pipeline, self.opts
        talker = SamplingParams(max_tokens=o.max_speech_tokens)  # greedy, as `omni chat` without --seed
        items = p.thinker.generate(rid, prompt, media, sampling, for_talker=True)
        items = talker_stream(p.talker, items, rid, o.voice, talker)
        items = vocoder_stream(p.vocoder_loop, items, o.voice, 0, max_codes=talker.max_tokens)  # seed 0: chat's
        text, pcm, n = [], [], 0
        async for ev in finish(items, prompt_tokens=int(prompt.input_ids.shape[0])):
            if isinstance(ev, TextDelta):
                text.append(ev.text)
            elif isinstance(ev, AudioChunk):
                pcm.append(ev.pcm)
            elif isinstance(ev, Finished):
                n = ev.completion_tokens
        return "".join(text), n, pcm16_bytes(np.concatenate(pcm)) if pcm else b""

    async def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        errors = list(batch["error"])
        captions, tokens, speech, secs = [""] * n, [0] * n, [b""] * n, [0.0] * n

        async def run(j: int) -> None:
            t0 = time.perf_counter()
            try:
                prompt, media = pickle.loads(batch["payload"][j])
                captions[j], tokens[j], speech[j] = await self._one(str(batch["path"][j]), prompt, media)
            except Exception as e:  # noqa: BLE001 - per row: a prompt over the context, a failing request
                errors[j] = one_line(f"{type(e).__name__}: {e}")
            secs[j] = time.perf_counter() - t0

        await asyncio.gather(*(run(j) for j in range(n) if not errors[j]))
        rest = {k: v for k, v in batch.items() if k != "payload"}
        return {**rest, "error": np.array(errors, dtype=object), "caption": np.array(captions, dtype=object),
                "num_tokens": np.array(tokens), "speech": np.array(speech, dtype=object),
                "thinker_s": np.array(secs), "thinker_node": np.array([self.node] * n, dtype=object),
                "thinker_pid": np.array([self.pid] * n), "thinker_ready_at": np.array([self.ready_at] * n)}


# ---------------------------------------------------------------------------------------------------- the driver
def build_dataset(files: list[InputFile], opts: CaptionOptions):
    """The lazy Ray Data pipeline over `files` (nothing runs until it is iterated)."""
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    gpus = opts.gpus_per_actor or None
    ds = ray.data.from_items([{"path": f.path, "rel": f.rel} for f in files],
                             override_num_blocks=max(1, min(len(files), -(-len(files) // 2))))
    ds = ds.map_batches(decode_batch, fn_kwargs={"opts": opts}, batch_size=None, num_cpus=opts.decode_cpus,
                        compute=TaskPoolStrategy(size=opts.decode_tasks))
    ds = ds.map_batches(EncoderStage, fn_constructor_kwargs={"opts": opts}, batch_size=opts.batch_size,
                        num_cpus=opts.encoder_cpus, num_gpus=gpus, resources=opts.encoder_resources or None,
                        compute=ActorPoolStrategy(size=opts.concurrency))
    calls = max(1, opts.thinker_calls)
    return ds.map_batches(ThinkerStage, fn_constructor_kwargs={"opts": opts}, batch_size=opts.batch_size,
                          num_cpus=opts.thinker_cpus, num_gpus=gpus, resources=opts.thinker_resources or None,
                          compute=ActorPoolStrategy(size=opts.concurrency, max_tasks_in_flight_per_actor=calls,
                                                    max_concurrent_calls_per_actor=calls))


def _init_ray() -> bool:
    """Connect to RAY_ADDRESS or start a local Ray, unless this process already has one -> whether we started it."""
    import logging

    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    # our own progress lines replace Ray Data's progress bars and execution logs
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return started


def _write_speech(speak_dir: Path, rows: list[dict]) -> None:
    from omni.serve.api.audio_io import wav_header

    for r in rows:
        if not r["error"] and len(r["speech"]):
            target = speak_dir / (r["rel"] + ".wav")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(wav_header(len(r["speech"])) + bytes(r["speech"]))
                os.replace(tmp, target)
            except OSError as e:
                raise CaptionError(f"cannot write speech {target}: {e.strerror or e}") from None


class _Interrupted(BaseException):
    """SIGTERM (or SIGINT), raised in the main thread: a BaseException like KeyboardInterrupt, so that no `except
    Exception` on the way (Ray Data's iterator has some) swallows it."""


class _Signals:
    """SIGINT and SIGTERM stop the job (rows committed so far stay; the rest is for --resume), but never inside a
    commit: a signal that arrives while rows are being written takes effect right after. Main thread only."""

    def __init__(self):
        self.committing = False
        self.pending: Optional[int] = None
        self.previous: dict = {}

    def _handler(self, signum, frame):
        if self.committing:
            self.pending = signum
        else:
            raise _Interrupted(signum)

    def __enter__(self) -> "_Signals":
        return self.install()

    def install(self) -> "_Signals":
        """(Again) after ray.init, whose core worker puts its own SIGTERM handler in (it dumps a stack and exits)."""
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handler)
                self.previous.setdefault(sig, previous)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def commit(self, fn: Callable[[], None]) -> None:
        self.committing = True
        try:
            fn()
        finally:
            self.committing = False
        if self.pending is not None:
            raise _Interrupted(self.pending)


def run_caption(inputs: list[str], out: str, opts: CaptionOptions = CaptionOptions(), resume: bool = False,
                retry_errors: bool = False, on_batch: Optional[Callable[[list[dict]], None]] = None,
                progress_every_s: float = 1.0) -> CaptionReport:
    """Caption every file of `inputs` into `out` (see the module docstring); `retry_errors` implies `resume`. Raises
    CaptionError when the job cannot start or its output cannot be written; SIGINT/SIGTERM stop it cleanly
    (report.interrupted)."""
    from omni.checkpoint import resolve_model

    t0 = time.perf_counter()
    resume = resume or retry_errors  # redoing the errored files keeps the others
    files = list_inputs(inputs)
    if not files:
        raise CaptionError(f"no files found in {' '.join(inputs)}")
    output = CaptionOutput(out)
    if not resume and output.path.exists() and output.path.stat().st_size:
        print(f"caption: replacing {out} (--resume continues it instead)", file=sys.stderr, flush=True)
    done = {r["path"] for r in output.open(resume, retry_errors)}
    pending = [f for f in files if f.path not in done]
    speak_dir = Path(opts.speak_dir) if opts.speak_dir else None
    if speak_dir is not None:
        try:
            speak_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CaptionError(f"cannot write speech to {speak_dir}: {e.strerror or e}") from None
    progress = Progress(len(pending), skipped=len(files) - len(pending), every_s=progress_every_s)
    stage_s = dict.fromkeys(STAGES, 0.0)
    nodes: dict = {s: set() for s in STAGES}
    pids: set = set()
    interrupted, started = 0, False
    wall0 = time.time()
    timeline: dict = {}

    def commit(rows: list[dict]) -> None:
        if speak_dir is not None:
            _write_speech(speak_dir, rows)
        output.append(rows)

    try:
        with _Signals() as signals:
            if pending:
                try:
                    resolve_model(opts.model)  # a bad --model fails here, clearly, before any worker starts
                except Exception as e:  # noqa: BLE001
                    raise CaptionError(f"cannot load model {opts.model!r}: {one_line(e)}") from None
                started = _init_ray()
                signals.install()
                timeline["ray"] = time.perf_counter() - t0
                for batch in build_dataset(pending, opts).iter_batches(batch_size=None, batch_format="numpy"):
                    rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["path"]))]
                    for r in rows:
                        r.update(seconds=sum(float(r[f"{s}_s"]) for s in STAGES), model=opts.model)
                        for s in STAGES:
                            stage_s[s] += float(r[f"{s}_s"])
                            nodes[s].add(str(r[f"{s}_node"]))
                        pids.add(int(r["thinker_pid"]))
                        for s in ("encode", "thinker"):
                            ready = float(r[f"{s}_ready_at"]) - wall0
                            timeline[f"{s}_ready"] = min(timeline.get(f"{s}_ready", ready), ready)
                    timeline.setdefault("first_row", time.perf_counter() - t0)
                    signals.commit(lambda: commit(rows))
                    progress.update(rows)
                    if on_batch is not None:
                        on_batch(rows)
    except KeyboardInterrupt:
        interrupted = signal.SIGINT
    except _Interrupted as e:
        interrupted = e.args[0]
    except CaptionError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray gave up (an actor that cannot start, a lost cluster): rows so far stay
        raise CaptionError(one_line(f"the job stopped after {progress.done} of {progress.total} files: "
                                    f"{type(e).__name__}: {e}; run again with --resume", 1000)) from e
    finally:
        output.close()
        if started:
            import ray

            ray.shutdown()
    if pending:
        progress.update([], force=True)
    progress.summary(out, bool(interrupted))
    seconds = timeline["end"] = time.perf_counter() - t0
    return CaptionReport(out=out, files=progress.done, ok=progress.ok, failed=progress.failed,
                         skipped=progress.skipped, seconds=seconds, files_per_s=progress.done / max(seconds, 1e-9),
                         stage_seconds=stage_s, nodes={s: sorted(v) for s, v in nodes.items()},
                         interrupted=int(interrupted), thinker_pids=sorted(pids), timeline=timeline)
