"""The worker-loop machine every batched stage runs on: one worker thread does the model work, an asyncio task
decides when to step and hands each step's outputs to the streams waiting for them.

A subclass says what one step is:
    _next_work()          on the event loop: what the next step would serve, or None when there is nothing to do
    _gather(work)         on the event loop, async: a chance to wait briefly for more input (default: none)
    _step(work)           in the worker thread: the model work, -> a result
    _deliver(work, result) on the event loop: publish outputs to the subscribers
    _failed(work, exc)    on the event loop: a step raised; fail whom it concerns (default: every subscriber)
Subscribers are keyed (one per request); `_subscribe(key)` is their async iterator; `_publish(key, item)` and
`_end(key)` feed it; an Exception published is raised in the subscriber. Used by omni.engine.EngineLoop (Thinker,
Talker) and omni.decoders.loop.VocoderLoop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import AsyncIterator, Callable, Hashable, Optional

__all__ = ["WorkerLoop"]

_END = object()


class WorkerLoop:
    def __init__(self, name: str):
        self.name = name
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._subscribers: dict[Hashable, asyncio.Queue] = {}

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

    # ------------------------------------------------------------------------------------------------ machine
    def wake(self) -> None:
        """Call after giving the loop new input (from the event loop's thread)."""
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
                self._wake.clear()
                if self._next_work() is None:  # input may have arrived between the check and the clear
                    await self._wake.wait()
                continue
            work = await self._gather(work)
            try:
                result = await loop.run_in_executor(self._executor, self._step, work)
            except Exception as exc:  # a failing step fails what it served, never hangs it
                self._failed(work, exc)
                continue
            self._deliver(work, result)

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
            self._closed(key)
