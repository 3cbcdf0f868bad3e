"""`omni caption`: batch media captioning as a Ray Data pipeline, resumable and fault tolerant.

    list (driver) -> read + sniff + decode + prompt (parallel tasks) -> encoders (actor pool, batched forwards)
        -> Thinker (actor pool, each a continuous-batching engine fed a whole batch at once) -> write (driver)

The driver lists the files, drops those already in the output (--resume), and consumes the dataset's blocks as they
complete, committing each block's rows to the output (serve/caption_output.py) before taking the next: an interrupt
loses at most the rows in flight. A file that cannot be read or decoded is a row with `error` set from the first stage
on; later stages pass such rows through, so every input file gives exactly one row. Ray Data restarts a killed actor
and retries its tasks, so a killed worker costs time, not rows.

The stages are in serve/cluster/caption_stages.py. What crosses a stage boundary is arrow-friendly: strings, numbers
and one binary column. `payload` holds a pickled (PreparedPrompt, Generation) after decoding (token ids [L], per-item
pixel patches / Whisper features, torch tensors; the request's sampling, voice and speech limits), then a pickled
(PromptLayout, Generation, MediaEmbeddings) after the encoders (embeddings [n_tokens, H] per item); the generator
drops it, so only rows travel back to the driver (plus 16-bit PCM in `speech` with --speak), written as CaptionRow.

Runs where Ray runs: a local Ray started here, or the cluster in RAY_ADDRESS. `encoder_resources` /
`thinker_resources` (custom Ray resources) pin each actor pool to the nodes that have them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omni.serve.caption_io import CaptionError, InputFile, list_inputs, one_line
from omni.serve.caption_output import CaptionOutput, CommitGuard, Interrupted, Progress, write_speech
from omni.serve.cluster.caption_options import CaptionOptions

__all__ = ["CaptionOptions", "CaptionReport", "run_caption", "build_dataset"]

STAGES = ("decode", "encode", "thinker")


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


# ---------------------------------------------------------------------------------------------------- the driver
def build_dataset(files: list[InputFile], opts: CaptionOptions):
    """The lazy Ray Data pipeline over `files` (nothing runs until it is iterated)."""
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from omni.serve.cluster.caption_stages import CaptionEncoders, CaptionGenerator, decode_batch

    gpus = opts.gpus_per_actor or None
    decode_tasks = opts.decode_tasks or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
    env = None if opts.worker_niceness is None else {"env_vars": {"RAY_worker_niceness": str(opts.worker_niceness)}}
    # 2 files per read/decode task, so decoded rows reach the encoders early; at most 4096 tasks for huge inputs
    blocks = min(max(1, -(-len(files) // 2)), 4096)
    ds = ray.data.from_items([{"path": f.path, "rel": f.rel} for f in files], override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"opts": opts},
        batch_size=None,
        num_cpus=opts.decode_cpus,
        compute=TaskPoolStrategy(size=decode_tasks),
        runtime_env=env,
    )
    ds = ds.map_batches(
        CaptionEncoders,
        fn_constructor_kwargs={"opts": opts},
        batch_size=opts.batch_size,
        num_cpus=opts.encoder_cpus,
        num_gpus=gpus,
        resources=opts.encoder_resources or None,
        compute=ActorPoolStrategy(size=opts.concurrency),
        runtime_env=env,
    )
    calls = max(1, opts.thinker_calls)
    return ds.map_batches(
        CaptionGenerator,
        fn_constructor_kwargs={"opts": opts},
        batch_size=opts.batch_size,
        num_cpus=opts.thinker_cpus,
        num_gpus=gpus,
        resources=opts.thinker_resources or None,
        compute=ActorPoolStrategy(
            size=opts.concurrency, max_tasks_in_flight_per_actor=calls, max_concurrent_calls_per_actor=calls
        ),
        runtime_env=env,
    )


def _check_voice(opts: CaptionOptions) -> None:
    from omni.checkpoint import list_voices
    from omni.types import InvalidRequest, check_voice

    voices = list_voices(opts.model)
    if not voices:
        raise CaptionError(f"--speak: {opts.model} has no speech output")
    try:
        check_voice(opts.voice, voices)
    except InvalidRequest as e:
        raise CaptionError(f"--voice: {e.message}") from None


def _init_ray() -> bool:
    """Connect to RAY_ADDRESS or start a local Ray, unless this process already has one -> whether we started it.
    Also sets this process's Ray Data context for the job (quiet, tolerant of actors dying while they start)."""

    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines replace Ray Data's bars and execution logs
    ctx.max_consecutive_actor_init_deaths = 3  # an actor whose worker dies while loading its model is replaced
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return started


def run_caption(
    inputs: list[str],
    out: str,
    opts: CaptionOptions = CaptionOptions(),
    resume: bool = False,
    retry_errors: bool = False,
    on_batch: Optional[Callable[[list[dict]], None]] = None,
    progress_every_s: float = 1.0,
) -> CaptionReport:
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
            write_speech(speak_dir, rows)
        output.append(rows)

    try:
        with CommitGuard() as signals:
            if pending:
                try:
                    resolve_model(opts.model)  # a bad --model fails here, clearly, before any worker starts
                except Exception as e:  # noqa: BLE001
                    raise CaptionError(f"cannot load model {opts.model!r}: {one_line(e)}") from None
                if speak_dir is not None:  # the job's voice, checked once here (its stages trust it)
                    _check_voice(opts)
                try:
                    started = _init_ray()
                except Exception as e:  # noqa: BLE001 - no Ray, no job: say which Ray
                    where = os.environ.get("RAY_ADDRESS") or "a local Ray"
                    raise CaptionError(f"cannot start or reach {where}: {one_line(e)}") from None
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
                    signals.commit(lambda rows=rows: commit(rows))
                    progress.update(rows)
                    if on_batch is not None:
                        on_batch(rows)
    except KeyboardInterrupt:
        interrupted = signal.SIGINT
    except Interrupted as e:
        interrupted = e.args[0]
    except CaptionError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray gave up (an actor that cannot start, a lost cluster): rows so far stay
        raise CaptionError(
            one_line(
                f"the job stopped after {progress.done} of {progress.total} files: "
                f"{type(e).__name__}: {e}; run again with --resume",
                1000,
            )
        ) from e
    finally:
        output.close()
        if started:
            import ray

            ray.shutdown()
    if pending:
        progress.update([], force=True)
    progress.summary(out, bool(interrupted))
    seconds = timeline["end"] = time.perf_counter() - t0
    return CaptionReport(
        out=out,
        files=progress.done,
        ok=progress.ok,
        failed=progress.failed,
        skipped=progress.skipped,
        seconds=seconds,
        files_per_s=progress.done / max(seconds, 1e-9),
        stage_seconds=stage_s,
        nodes={s: sorted(v) for s, v in nodes.items()},
        interrupted=int(interrupted),
        thinker_pids=sorted(pids),
        timeline=timeline,
    )
