"""One request in an engine (omni/engine.py): what a stage (Thinker, Talker) defines per request, and the state
the engine keeps on it (its KV slot, its prepared prefill, the last id sampled on the device)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any, Optional

import torch

from omni.sampling import Sampler, TokenHistory

__all__ = ["Sequence", "Inbox"]


class Sequence:
    """One request in an engine. Subclasses define the inputs and what happens with each output.

    The engine calls, from its worker thread: `prefill_inputs()` once when `ready_to_prefill()`, then
    `on_prefill(hidden [1, L, H], token)` with the id sampled from the prefill's logits by `self.sampler`; each step,
    `next_input()` (None: idle this step) and `on_step(hidden [1, H], token)`. Before each call with a token the engine
    sets `self.last_token` (long [1], on the device: the same id, for the next input's embedding without a host
    round trip). Outputs for the consumer go to `self.outbox` (thread-safe deque). Other threads may call `cancel()`
    and subclass feed methods, which must only append to deques (or put into an `Inbox`). The event loop's thread
    also calls `ready_to_prefill()` and `has_input()` during a step (the engine's `ready_sequences`, for its
    accounting): what they change must be safe from two threads at once.

    What `append_token` needs is given here: the id limit, the stop ids, and the repetition-penalty history (a
    subclass whose history is known only at prefill, like the Talker's, sets `self.history` in `prefill_inputs`).
    """

    urgent = False  # True while the request's first output downstream is pending: no batch timer waits for it
    samples_prefill = True  # False: the reply is known in advance (no id is sampled from the prefill)

    def __init__(self, request_id: str, max_tokens: int, stop_ids: set[int], history: Optional[torch.Tensor] = None):
        self.request_id = request_id
        self.max_tokens = max_tokens  # generated ids at most (the stop id counts)
        self.stop_ids = stop_ids  # ids that end the sequence (kept in the output)
        self.history = history  # [1, n] long: what the repetition penalty sees (prompt ids + generated)
        self.sampler: Optional[Sampler] = None  # set by the subclass
        self.last_token: Optional[torch.Tensor] = None  # long [1] on the device: the id given to on_prefill/on_step
        self.finished = False
        self.cancelled = False
        self.outbox: collections.deque = collections.deque()
        self.slot: Optional[int] = None  # the engine's KV slot while it holds one
        self.prepared = None  # the engine's prefill inputs, computed while the request waits for KV room

    @property
    def history(self) -> Optional[torch.Tensor]:
        return None if self._history is None else self._history.ids

    @history.setter
    def history(self, ids: Optional[torch.Tensor]) -> None:
        self._history = None if ids is None else TokenHistory(ids, self.max_tokens)

    def cancel(self) -> None:
        self.cancelled = True

    def append_token(self, token: int, generated: list[int]) -> tuple[bool, bool]:
        """Record a sampled id (in `generated` and the repetition-penalty history); -> (stop: a stop id, last: stop or
        `self.max_tokens` reached)."""
        generated.append(token)
        if self._history is not None:
            self._history.append(token)  # a scalar write on the device: no host sync
        stop = token in self.stop_ids
        return stop, stop or len(generated) >= self.max_tokens

    def ready_to_prefill(self) -> bool:
        return True

    def prefill_inputs(self) -> tuple:
        """(embeds [L, H_in], positions [3, L]) or (embeds, positions, kwargs for this prefill's model.forward)."""
        raise NotImplementedError

    def prefill_chunk_kwargs(self, kwargs: dict, start: int, end: int) -> Optional[dict]:
        """The forward kwargs for prompt positions [start, end) of a chunked prefill, from the whole prompt's
        `kwargs`; None: this prefill cannot be chunked (it runs in one forward). Without kwargs any prompt can."""
        return {} if not kwargs else None

    def on_prefill(self, hidden: torch.Tensor, token: Optional[int]) -> None:
        raise NotImplementedError

    def next_input(self) -> Optional[tuple[torch.Tensor, int | float]]:  # (embed [H_in], position) or None
        raise NotImplementedError

    def has_input(self) -> bool:
        """Cheap check that next_input() would not be None (called from the event loop between steps)."""
        return self.next_input() is not None

    def on_step(self, hidden: torch.Tensor, token: int) -> None:
        raise NotImplementedError


class Inbox:
    """What an upstream stage feeds a sequence (the Thinker's items to a Talker row), in order. Fed from the consumer's
    thread; taken by whichever thread asks for the sequence's input: the engine's step in its worker thread, and the
    event loop's thread, whose accounting asks `has_input()` during a step. So the taking holds a lock: two threads
    draining at once each popped items and applied them in their own order, so a Talker row could read its Thinker's
    replies out of order."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._taking = threading.Lock()

    def put(self, item: Any) -> None:
        self._items.append(item)

    def take(self, apply: Callable[[Any], None]) -> None:
        """`apply(item)` for each item fed so far, in the order fed, in the calling thread."""
        with self._taking:
            while self._items:
                apply(self._items.popleft())

    def __len__(self) -> int:
        return len(self._items)
