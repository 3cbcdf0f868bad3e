"""The worker-loop machine every batched stage runs on: one worker thread does the model work, an asyncio task
decides when to step and hands each step's outputs to the streams waiting for them.

A subclass says what one step is:
    _next_work()          on the event loop: what the next step would serve, or None when there is nothing to do
    _gather(work)         on the event loop, async: a chance to wait briefly for more input (default: none)
    _step(work)           in the worker thread: the model work, -> a result
    _deliver(work, result) on the event loop: publish outputs to the subscribers
    _failed(work, exc)    on the event loop: a step raised; fail whom it concerns (default: every subscriber)
    _ready_keys()         on the event loop: the keys whose input is there, that the next step would serve
    _load()               on the event loop: (running, waiting) requests of the stage, for `loop_stats`
Subscribers are keyed (one per request); `_subscribe(key)` is their async iterator; `_publish(key, item)` and
`_end(key)` feed it; an Exception published is raised in the subscriber. Used by omni.engine.EngineLoop (Thinker,
Talker) and omni.decoders.loop.VocoderLoop.

Accounting (`loop_stats`): steps, the items each served (batch size), the seconds they took, and the queue time: from
when a key's input was there (stamped at `wake()`, which callers run after giving input, and after each step for keys
still ready) to the start of the step that serves it; a stage whose steps are long, or that waits on a batch timer,
shows here.

Step trace: with OMNI_LOOP_TRACE=PATH in a process's environment (a replica's too: Ray passes `omni serve`'s environment
on), every loop made in it appends one JSON line per step to PATH: the loop's name, the step's start and end (Unix
seconds: lines from several processes line up), the keys it served, and what the worker thread spent on it (CPU
seconds, minor page faults). `python tools/loop_trace.py PATH` summarises it per loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import resource
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["WorkerLoop", "LoopStats"]

_END = object()
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)  # the calling thread's (Linux)


@dataclass
class LoopStats:
    """Counters of one worker loop since it was made (what /metrics exports per stage)."""

    steps: int = 0  # model steps run
    step_items: int = 0  # keys served, summed over the steps (mean batch size = step_items / steps)
    max_items: int = 0  # most keys in one step
    step_s: float = 0.0  # seconds in steps (worker thread)
    queued: int = 0  # (key, step) pairs whose queue time was measured
    queue_s: float = 0.0  # their queue seconds, summed
    max_queue_s: float = 0.0


class WorkerLoop:
    def __init__(self, name: str):
        self.name = name
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._subscribers: dict[Hashable, asyncio.Queue] = {}
        self.counters = LoopStats()
        self._ready_since: dict[Hashable, float] = {}  # key -> when its input was there, until a step serves it
        self._trace = os.environ.get("OMNI_LOOP_TRACE")  # a path: one JSON line per step (the module's docstring)

    # ------------------------------------------------------------------------------------------------ subclass hooks
    def _next_work(self):
        raise NotImplementedError

    async def _gather(self, work):
        return work

    def _step(self, work):
        raise NotImplementedError

    def _deliver(self, work, result) -> None:
        raise NotImplementedError

    def _failed(self, work, exc: Exception) -> None:
        for q in self._subscribers.values():
            q.put_nowait(exc)

    def _closed(self, key: Hashable) -> None:
        """A subscriber left (finished, failed or cancelled)."""

    def _ready_keys(self) -> Iterable[Hashable]:
        """Keys whose input is there (the next step serves them); default: none measured."""
        return ()

    def _load(self) -> tuple[int, int]:
        """(running, waiting) requests of this stage; default: subscribers, none waiting."""
        return len(self._subscribers), 0

    def loop_stats(self) -> dict:
        """The accounting counters and the stage's running / waiting requests now."""
        running, waiting = self._load()
        return {**asdict(self.counters), "running": running, "waiting": waiting}

    def _stamp_ready(self) -> None:
        now = time.perf_counter()
        for key in self._ready_keys():
            self._ready_since.setdefault(key, now)

    def _account_start(self) -> int:
        """At a step's start: the queue time of each ready key it serves; -> how many keys it serves."""
        now, c = time.perf_counter(), self.counters
        keys = list(self._ready_keys())
        for key in keys:
            since = self._ready_since.pop(key, now)
            c.queued += 1
            c.queue_s += now - since
            c.max_queue_s = max(c.max_queue_s, now - since)
        return len(keys)

    async def _wait_while(self, waiting: Callable[[], object], seconds: float) -> None:
        """For `_gather`: wait while `waiting()` is truthy, at most `seconds`, checking again at each `wake()`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        wake = self._wake
        assert wake is not None  # made by the task that runs this loop (_ensure_running)
        while waiting() and (left := deadline - loop.time()) > 0:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), left)
            except asyncio.TimeoutError:
                return

    # ------------------------------------------------------------------------------------------------ machine
    def wake(self) -> None:
        """Call after giving the loop new input (from the event loop's thread)."""
        self._stamp_ready()
        if self._wake is not None:
            self._wake.set()

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name=f"{self.name}-loop")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            work = self._next_work()
            if work is None:
                assert self._wake is not None  # made with this task, by _ensure_running
                self._wake.clear()
                if self._next_work() is None:  # input may have arrived between the check and the clear
                    await self._wake.wait()
                continue
            work = await self._gather(work)
            self._stamp_ready()  # input that came without a wake()
            items, t0 = self._account_start(), time.perf_counter()
            step = self._step if self._trace is None else functools.partial(self._traced_step, items=items)
            try:
                result = await loop.run_in_executor(self._executor, step, work)
            except Exception as exc:  # a failing step fails what it served, never hangs it
                self._failed(work, exc)
                continue
            finally:
                c = self.counters
                c.steps, c.step_items, c.max_items = c.steps + 1, c.step_items + items, max(c.max_items, items)
                c.step_s += time.perf_counter() - t0
            self._deliver(work, result)
            self._stamp_ready()  # what is still ready queues from now

    def _traced_step(self, work, items: int):
        """`_step`, then its trace line (in the worker thread: what the thread spent on it is measured there)."""
        start, u0, c0 = time.time(), resource.getrusage(_RUSAGE_THREAD), time.thread_time()
        try:
            return self._step(work)
        finally:
            line = {
                "loop": self.name,
                "start": start,
                "end": time.time(),
                "keys": items,
                "cpu_s": time.thread_time() - c0,
                "minflt": resource.getrusage(_RUSAGE_THREAD).ru_minflt - u0.ru_minflt,
            }
            assert self._trace is not None
            with open(self._trace, "a") as f:  # one short append per step: lines of several processes don't interleave
                f.write(json.dumps(line) + "\n")

    def _publish(self, key: Hashable, item) -> None:
        q = self._subscribers.get(key)
        if q is not None:
            q.put_nowait(item)

    def _end(self, key: Hashable) -> None:
        self._publish(key, _END)

    async def _subscribe(self, key: Hashable, start: Optional[Callable[[], None]] = None) -> AsyncIterator:
        """The items published for `key`, in order, until `_end(key)`; an Exception published is raised. On the first
        iteration the key is registered, then `start()` gives the loop its work, then the loop is woken."""
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers[key] = q
        try:
            if start is not None:
                start()
            self._ensure_running()
            assert self._wake is not None
            self._wake.set()
            while True:
                item = await q.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._subscribers.pop(key, None)
            self._ready_since.pop(key, None)
            self._closed(key)
