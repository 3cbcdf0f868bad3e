"""The asyncio side of the decode engine (omni/engine.py): `EngineLoop` runs one Engine in a worker thread
(omni.loop.WorkerLoop) and streams each request's outputs. It reads the engine only through its public methods
(add, step, reset, can_progress, waiting_rows, has_urgent_row, ready_sequences, load) and does not import it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from omni.loop import WorkerLoop
from omni.sequence import Sequence

__all__ = ["EngineLoop"]


class EngineLoop(WorkerLoop):
    """Runs an Engine in one worker thread, driven from an asyncio loop. `submit(seq)` returns an async iterator over
    the sequence's outputs; breaking out of it (or cancelling the consuming task) cancels the sequence, which frees
    its slot at the next step boundary. A step that raises fails every sequence the engine holds and resets it."""

    def __init__(self, engine):  # an omni.engine.Engine (not imported: the engine module re-exports this one)
        super().__init__(engine.name)
        self.engine = engine
        self._seqs: dict[int, Sequence] = {}

    def _next_work(self):
        return True if self.engine.can_progress() else None

    async def _gather(self, work):
        """With `batch_wait_s`, wait (briefly) for running rows whose input is not there yet, so that rows fed by
        one upstream step share one forward."""
        wait = self.engine.config.batch_wait_s
        if wait <= 0 or not self.engine.waiting_rows() or self.engine.has_urgent_row():
            return work
        await self._wait_while(self.engine.waiting_rows, wait)
        return work

    def _step(self, work) -> list[Sequence]:
        return self.engine.step()

    def _ready_keys(self) -> list[int]:
        return [id(s) for s in self.engine.ready_sequences()]

    def _load(self) -> tuple[int, int]:
        return self.engine.load()

    def _deliver(self, work, touched: list[Sequence]) -> None:
        for seq in touched:
            key = id(seq)
            while seq.outbox:
                self._publish(key, seq.outbox.popleft())
            if seq.finished:
                self._end(key)

    def _failed(self, work, exc: Exception) -> None:
        super()._failed(work, exc)
        self.engine.reset()

    def _closed(self, key) -> None:
        seq = self._seqs.pop(key, None)
        if seq is not None and not seq.finished:
            seq.cancel()
            self.wake()

    def submit(self, seq: Sequence) -> AsyncIterator:
        """Async iterator over `seq`'s outputs, in order; raises if the engine failed."""
        key = id(seq)

        def start():
            self._seqs[key] = seq
            self.engine.add(seq)

        return self._subscribe(key, start)
