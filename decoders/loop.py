"""The vocoder's run loop: the open streams of this process are served by batched `step` calls (Token2Wav or
Code2Wav, in a worker thread) whenever some of them have a chunk ready (omni.loop.WorkerLoop), by deadline.

Deadline: each stream's audio is taken to play in real time from its first chunk, so its deadline is when what it has
sent so far runs out. A stream that has sent nothing yet (its first chunk is pending) comes first: when first chunks
are ready, a step serves them and only the started streams whose deadline falls within `urgent_s` (they would stall
if they waited one more step); the others follow in the next step. Otherwise a step serves every ready stream, the
earliest deadline first. A step computes one chunk of each stream it serves (`chunks_per_step`), so steps stay short
and a stream behind by several chunks does not hold a first chunk up. Which chunks a stream's step computes never
depends on the others, so the order changes when audio comes, never what it is.

A step of first chunks alone first waits (up to `first_chunk_wait_s`) while other streams' first chunks are on their
way (codes came, not ready yet): a step costs about the same for one first chunk as for several, and one begun alone
would hold the others' first audio for its whole length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Optional

import numpy as np

from omni.loop import WorkerLoop
from omni.types import AUDIO_SAMPLE_RATE, TalkerToVocoder
from omni.decoders.token2wav import Token2Wav, VocoderStream

__all__ = ["VocoderLoop"]


class VocoderLoop(WorkerLoop):
    def __init__(
        self,
        vocoder: Token2Wav,
        urgent_s: float = 0.25,
        chunks_per_step: Optional[int] = 1,
        first_chunk_wait_s: float = 0.3,
    ):
        super().__init__("vocoder")
        self.vocoder = vocoder
        self.urgent_s = urgent_s  # a started stream whose audio runs out sooner than this is served with first chunks
        # before a step of first chunks only, wait up to this for the first chunks of other streams whose codes are
        # coming: a step costs about the same for one first chunk as for eight (tools/vocoder_steps.py), and one begun
        # alone holds the others' first audio for its whole length (BENCHMARKS.md §10)
        self.first_chunk_wait_s = first_chunk_wait_s
        self.chunks_per_step = chunks_per_step  # chunks of one stream per step (None: all it has ready): short steps,
        #                                         so a first chunk or a stream about to run dry waits less
        # a vocoder that steps whole streams (chunked_steps False: Code2Wav) is stepped without a chunk limit
        self._limit = (
            {"chunks_per_stream": chunks_per_step} if chunks_per_step is not None and vocoder.chunked_steps else {}
        )
        self._streams: dict[int, VocoderStream] = {}
        self._play_end: dict[int, float] = {}  # key -> when its audio sent so far has played (perf_counter)
        self.num_calls = 0  # batched step calls so far
        self.max_batch = 0  # most streams in one call
        self.first_chunk_steps = 0  # steps that served first chunks ahead of other ready streams

    def _next_work(self):
        for key, s in list(self._streams.items()):
            if s.finished:  # its last chunks were delivered by an earlier step (same thread as this check)
                self._streams.pop(key)
                self._end(key)
        ready = [s for s in self._streams.values() if s.ready]
        if not ready:
            return None
        ready.sort(key=self.deadline)
        fresh = [s for s in ready if id(s) not in self._play_end]
        if fresh and len(fresh) < len(ready):
            soon = time.perf_counter() + self.urgent_s
            self.first_chunk_steps += 1
            return fresh + [s for s in ready if id(s) in self._play_end and self._play_end[id(s)] < soon]
        return ready

    def _first_chunks_coming(self) -> bool:
        """Some stream has codes but no audio yet and is not ready: its first chunk is on its way."""
        return any(id(s) not in self._play_end and s.receiving and not s.ready for s in self._streams.values())

    async def _gather(self, work):
        """A step of first chunks alone waits (up to first_chunk_wait_s, woken by each push) for the first chunks on
        their way, then serves them all; a step with a started stream in it never waits."""
        wait = self.first_chunk_wait_s
        if wait <= 0 or any(id(s) in self._play_end for s in work) or not self._first_chunks_coming():
            return work
        await self._wait_while(self._first_chunks_coming, wait)
        return self._next_work() or work

    def deadline(self, stream: VocoderStream) -> float:
        """When the stream's audio sent so far runs out; -inf before its first chunk (first chunks come first)."""
        return self._play_end.get(id(stream), float("-inf"))

    def _ready_keys(self) -> list[int]:
        return [key for key, s in self._streams.items() if s.ready]

    def _load(self) -> tuple[int, int]:
        """(open streams, streams with a chunk ready)."""
        return len(self._streams), sum(1 for s in self._streams.values() if s.ready)

    def _step(self, streams: list[VocoderStream]) -> list[list[np.ndarray]]:
        return self.vocoder.step(streams, **self._limit)

    def _deliver(self, streams: list[VocoderStream], chunks: list[list[np.ndarray]]) -> None:
        self.num_calls += 1
        self.max_batch = max(self.max_batch, len(streams))
        now = time.perf_counter()
        for s, pcm in zip(streams, chunks):
            seconds = sum(len(c) for c in pcm) / AUDIO_SAMPLE_RATE
            if seconds > 0:
                self._play_end[id(s)] = max(self._play_end.get(id(s), now), now) + seconds
            for c in pcm:
                self._publish(id(s), c)

    def _failed(self, streams: list[VocoderStream], exc: Exception) -> None:
        for s in streams:  # fail the streams of this call, keep serving the others
            self._streams.pop(id(s), None)
            self._publish(id(s), exc)

    def _closed(self, key) -> None:
        self._streams.pop(key, None)
        self._play_end.pop(key, None)

    async def run(self, stream: VocoderStream, codes: AsyncIterator[TalkerToVocoder]) -> AsyncIterator[np.ndarray]:
        """PCM chunks of `stream` ([n] float32, 24 kHz) as the codes arrive."""
        key = id(stream)

        async def feed():
            try:
                async for item in codes:
                    stream.push(item.codes, last=item.last)
                    self.wake()
            except Exception as exc:  # bad codes: this stream fails, the loop goes on
                self._streams.pop(key, None)
                self._publish(key, exc)

        feeder = None

        def start():
            nonlocal feeder
            self._streams[key] = stream
            feeder = asyncio.ensure_future(feed())

        try:
            async for pcm in self._subscribe(key, start):
                yield pcm
        finally:
            if feeder is not None:
                feeder.cancel()

    def stats(self) -> dict:
        return {
            "calls": self.num_calls,
            "max_batch": self.max_batch,
            "open": len(self._streams),
            "first_chunk_steps": self.first_chunk_steps,
        }
