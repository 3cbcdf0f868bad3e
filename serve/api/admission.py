"""Admission on one app: chat completions in flight (past the limit: 503), each admitted one's resources (slot,
metrics track, backend stream, speech slot) released exactly once, and the speech streams' gate: at most
`max_speech_streams` in flight (chat completions with audio and /v1/audio/speech alike), so that a new stream does
not make the running ones stall (the machine makes only so many streams of real-time speech: BENCHMARKS.md measures
it per stage). A speech request past that limit waits its turn, first come first served, up to `speech_wait_s`, then
gets 503 + Retry-After. Text-only requests never wait on the gate."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Optional

import anyio

from omni.types import Event
from omni.serve.api.metrics import RequestTrack

__all__ = ["Admission", "Admitted", "SpeechGate"]

log = logging.getLogger("omni.serve.api.server")


class Admission:
    """Counts chat completions in flight on this app; refuses past the limit."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class Admitted:
    """One admitted chat completion's resources: its concurrency slot, its metrics track and the backend stream.
    `release` is idempotent and runs on every path (error, success, cancellation, a response never sent)."""

    def __init__(self, admission: Admission, track: RequestTrack):
        self.admission, self.track = admission, track
        self.request_id = ""  # set once known
        self.events: Optional[AsyncIterator[Event]] = None
        self._released = False
        self.on_release = None  # a callable run once at release (the speech slot)

    async def release(self, ok: bool) -> None:
        if self._released:
            return
        self._released = True
        if self.on_release is not None:
            self.on_release()
        try:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):  # runs even while the request's scope is being cancelled
                    await aclose()
        except Exception:
            log.exception("closing the backend stream failed")
        finally:
            self.admission.release()
            self.track.close(ok)


class SpeechGate:
    """Speech streams in flight, at most `limit`: a new one past it waits its turn, first come first served, up to
    `wait_s`; then `acquire` says False (the caller answers 503 + Retry-After)."""

    def __init__(self, limit: Optional[int], wait_s: float):
        self.limit, self.wait_s = limit, wait_s  # limit None: no limit
        self.active = 0  # speech streams admitted and not released
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    async def acquire(self) -> bool:
        """A slot (True), or False when none freed up within `wait_s`."""
        if self.limit is None or (self.active < self.limit and not self.waiting):
            self.active += 1
            return True
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_s)
            return True  # release() handed its slot over (active unchanged)
        except asyncio.TimeoutError:
            return self._give_up(turn)
        except asyncio.CancelledError:  # the client went away while waiting
            self._give_up(turn)
            raise
        finally:
            if turn in self._waiters:
                self._waiters.remove(turn)

    def _give_up(self, turn: asyncio.Future) -> bool:
        if turn.done() and not turn.cancelled():  # handed over just as we gave up: pass it on
            self.release()
        else:
            turn.cancel()
        return False

    def release(self) -> None:
        """Hand the slot to the first waiter, else free it."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1
