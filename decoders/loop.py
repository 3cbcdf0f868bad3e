"""The vocoder's run loop: every open stream of this process is served by one batched `step` call (Token2Wav or
Code2Wav, in a worker thread) whenever some of them have a chunk ready (omni.loop.WorkerLoop)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import numpy as np

from omni.loop import WorkerLoop
from omni.types import TalkerToVocoder

from omni.decoders.token2wav import Token2Wav, VocoderStream

__all__ = ["VocoderLoop"]


class VocoderLoop(WorkerLoop):
    def __init__(self, vocoder: Token2Wav):
        super().__init__("vocoder")
        self.vocoder = vocoder
        self._streams: dict[int, VocoderStream] = {}
        self.num_calls = 0  # batched step calls so far
        self.max_batch = 0  # most streams in one call

    def _next_work(self):
        for key, s in list(self._streams.items()):
            if s.finished:  # its last chunks were delivered by an earlier step (same thread as this check)
                self._streams.pop(key)
                self._end(key)
        ready = [s for s in self._streams.values() if s.ready]
        return ready or None

    def _step(self, streams: list[VocoderStream]) -> list[list[np.ndarray]]:
        return self.vocoder.step(streams)

    def _deliver(self, streams: list[VocoderStream], chunks: list[list[np.ndarray]]) -> None:
        self.num_calls += 1
        self.max_batch = max(self.max_batch, len(streams))
        for s, pcm in zip(streams, chunks):
            for c in pcm:
                self._publish(id(s), c)

    def _failed(self, streams: list[VocoderStream], exc: Exception) -> None:
        for s in streams:  # fail the streams of this call, keep serving the others
            self._streams.pop(id(s), None)
            self._publish(id(s), exc)

    def _closed(self, key) -> None:
        self._streams.pop(key, None)

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
        return {"calls": self.num_calls, "max_batch": self.max_batch, "open": len(self._streams)}
