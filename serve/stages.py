"""Stage composition as async streams: each stage consumes its upstream's items, passes through what is not for it,
and yields its own outputs as they come. The in-process pipeline chains them directly; the Ray deployments chain the
same functions over DeploymentHandle generators. No ray import here.

    thinker items:  TextDelta, TalkerPrompt, ThinkerToTalker, ThinkerDone
    talker_stream:  consumes TalkerPrompt / ThinkerToTalker; yields TalkerToVocoder, TalkerDone (+ passes the rest)
    vocoder_stream: consumes TalkerToVocoder; yields AudioChunk (+ passes the rest)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import AsyncIterator, Callable, Optional

import numpy as np

from omni.talker import Talker
from omni.types import AudioChunk, SamplingParams, TalkerPrompt, TalkerToVocoder, ThinkerToTalker

__all__ = ["merge_with_upstream", "talker_stream", "VocoderLoop", "vocoder_stream"]

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


async def merge_with_upstream(upstream: AsyncIterator, consume: Callable[[object], bool],
                              own: AsyncIterator) -> AsyncIterator:
    """Yield the items of `upstream` that `consume(item)` does not take, interleaved with the items of `own`, in
    arrival order, until both end. An error on either side is raised here; leaving early cancels both sides."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(source, filt):
        try:
            async for item in source:
                if filt is None or not filt(item):
                    out.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
            out.put_nowait(_Failed(exc))
        finally:
            out.put_nowait(_DONE)

    tasks = [asyncio.ensure_future(pump(upstream, consume)), asyncio.ensure_future(pump(own, None))]
    try:
        ended = 0
        while ended < 2:
            item = await out.get()
            if item is _DONE:
                ended += 1
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def talker_stream(talker: Talker, upstream: AsyncIterator, request_id: str, voice: str,
                  sampling: SamplingParams) -> AsyncIterator:
    seq, own = talker.generate(request_id, voice, sampling)

    def consume(item) -> bool:
        if isinstance(item, (TalkerPrompt, ThinkerToTalker)):
            seq.feed(item)
            talker.loop.wake()
            return True
        return False

    return merge_with_upstream(upstream, consume, own)


class VocoderLoop:
    """Runs the chunked vocoder for every open stream of this process: whenever some streams have a chunk ready, one
    batched `Token2Wav.step` call (in a worker thread) serves them all."""

    def __init__(self, vocoder):
        self.vocoder = vocoder  # omni.decoders.token2wav.Token2Wav
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vocoder")
        self._streams: dict[int, tuple[object, asyncio.Queue]] = {}
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._ended: set[int] = set()
        self.num_calls = 0  # batched step calls so far
        self.max_batch = 0

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="vocoder-loop")

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for key, (s, q) in list(self._streams.items()):
                if s.finished and key not in self._ended:  # after its last chunks were dispatched (same thread)
                    self._ended.add(key)
                    q.put_nowait(_DONE)
            ready = [(s, q) for s, q in self._streams.values() if s.ready and not s.finished]
            if not ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            streams = [s for s, _ in ready]
            try:
                chunks = await loop.run_in_executor(self._executor, self.vocoder.step, streams)
            except Exception as exc:  # fail the streams of this call, keep serving the others
                for _, q in ready:
                    q.put_nowait(exc)
                continue
            self.num_calls += 1
            self.max_batch = max(self.max_batch, len(streams))
            for (s, q), pcm in zip(ready, chunks):
                for c in pcm:
                    q.put_nowait(c)

    async def run(self, stream, codes: AsyncIterator[TalkerToVocoder]) -> AsyncIterator[np.ndarray]:
        """PCM chunks of `stream` as the codes arrive."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[id(stream)] = (stream, q)
        self._ensure_running()

        async def feed():
            async for item in codes:
                stream.push(item.codes, last=item.last)
                self.wake()

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                getter = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter, feeder} if not feeder.done() else {getter},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    feeder.result()  # re-raise a failed feed
                    continue
                item = getter.result()
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            feeder.cancel()
            self._streams.pop(id(stream), None)
            self._ended.discard(id(stream))


def vocoder_stream(loop: VocoderLoop, upstream: AsyncIterator, voice: str, seed: int,
                   max_codes: int) -> AsyncIterator:
    stream = loop.vocoder.open_stream(voice, seed, max_codes=max_codes)
    codes: asyncio.Queue = asyncio.Queue()

    def consume(item) -> bool:
        if isinstance(item, TalkerToVocoder):
            codes.put_nowait(item)
            return True
        return False

    async def code_items():
        while True:
            item = await codes.get()
            yield item
            if item.last:
                return

    async def audio():
        async for pcm in loop.run(stream, code_items()):
            yield AudioChunk(pcm)

    return merge_with_upstream(upstream, consume, audio())
