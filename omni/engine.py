"""The decode engine shared by the Thinker and the Talker: continuous batching over a transformers decoder fed with
`inputs_embeds` and explicit 3-D (M-RoPE) positions, which transformers' own continuous batching cannot take.

Requests join and leave a running batch at step boundaries. Each request owns a row ("slot") of one batched KV
cache; rows are left-padded to a common length and a 0/1 attention mask hides the padding. A request is prefilled
alone (bit-identical to the official path), then its cache is merged into the batch. So that arrivals do not stall
the running decodes, a step prefills at most `max_prefill_tokens` prompt tokens (whole prompts, first come first
served; the first always goes) and, with `prefill_chunk_tokens`, a long prompt is prefilled that many tokens per step
over its own growing cache, between the decode steps (attention over the earlier chunks' cache: the same
computation in other kernel shapes, logits within ~1e-6, tokens equal in the golden tests). Every decode step is one
batched forward over all rows; a row whose next input is not known yet (a Talker waiting for its Thinker) idles in a
masked column and does not advance. Positions are each row's solo positions, so a row computes what it computes
alone (tokens equal; logits within ~1e-7, from batch-size-dependent matmul kernels).

Stage-specific logic lives in `Sequence` subclasses (omni/thinker.py, omni/talker.py); the engine knows nothing of
text or speech. The engine is synchronous and single-threaded; `EngineLoop` (on omni.loop.WorkerLoop) runs it in a
worker thread for asyncio.
"""
from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from omni.loop import WorkerLoop
from omni.types import SamplingParams

__all__ = ["DecoderModel", "Sequence", "Engine", "EngineConfig", "EngineLoop", "Sampler"]


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # rows in the running batch at most; more requests wait for a free slot
    max_dead_columns: int = 64  # compact the cache once this many columns are padding for every row
    batch_wait_s: float = 0.0  # when some running rows wait for input (a Talker behind its Thinker), wait this long
    #                            for them before stepping, so the rows fed by one upstream step share one forward
    max_prefill_tokens: int = 8192  # prompt tokens prefilled per step at most (the first prompt or chunk always goes;
    #                                 the rest wait for the next step, after a decode); 0: no limit
    prefill_chunk_tokens: int = 0  # > 0: a longer prompt is prefilled this many tokens per step, interleaved with the
    #                                decode steps; 0: every prompt in one forward (bit-identical to the official path)

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_dead_columns < 1:
            raise ValueError(f"max_num_seqs and max_dead_columns must be >= 1, got {self.max_num_seqs}, "
                             f"{self.max_dead_columns}")
        if self.max_prefill_tokens < 0 or self.prefill_chunk_tokens < 0:
            raise ValueError(f"max_prefill_tokens and prefill_chunk_tokens must be >= 0, got "
                             f"{self.max_prefill_tokens}, {self.prefill_chunk_tokens}")
        if not 0 <= self.batch_wait_s <= 1:
            raise ValueError(f"batch_wait_s must be in [0, 1] seconds, got {self.batch_wait_s}")


@dataclass
class DecoderModel:
    """How to run one decoder: forward(embeds [B, T, H_in], positions [3, B, T], mask [B, kv + T], cache, **prefill
    kwargs) -> hidden [B, T, H]; head(hidden [B, T, H]) -> float logits [B, V] of the last position; config for
    DynamicCache. `after_step(seqs)`, when set, runs once per engine step on the sequences that produced output (a
    batched post-step such as Qwen3's code predictor)."""
    forward: Callable
    head: Callable
    config: object
    device: torch.device
    after_step: Optional[Callable] = None


class Sampler:
    """Per-request sampling, in the order transformers' generate applies it: repetition penalty, suppressed tokens,
    then (when sampling) temperature, top-k, top-p; a per-request torch.Generator (never the global RNG)."""

    def __init__(self, params: SamplingParams, suppress: tuple[int, ...] = (), device="cpu"):
        self.params = params
        procs = []
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
        if suppress:
            procs.append(SuppressTokensLogitsProcessor(list(suppress), device=device))
        if not params.greedy:
            procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
        self.processors = LogitsProcessorList(procs)
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, history: torch.Tensor, logits: torch.Tensor) -> int:
        """history [1, n] long (what the repetition penalty sees), logits [1, V] float -> the next id."""
        scores = self.processors(history, logits)
        if self.generator is None:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Sequence:
    urgent = False  # True while the request's first output downstream is pending: no batch timer waits for it

    """One request in an engine. Subclasses define the inputs and what happens with each output.

    The engine calls, from its worker thread: `prefill_inputs()` once when `ready_to_prefill()`, then
    `on_prefill(hidden [1, L, H], logits [1, V])`; each step, `next_input()` (None: idle this step) and
    `on_step(hidden [1, H], logits [1, V])`. Outputs for the consumer go to `self.outbox` (thread-safe deque).
    Other threads may call `cancel()` and subclass feed methods, which must only append to deques.

    What `append_token` needs is given here: the id limit, the stop ids, and the repetition-penalty history (a
    subclass whose history is known only at prefill, like the Talker's, sets `self.history` in `prefill_inputs`).
    """

    def __init__(self, request_id: str, max_tokens: int, stop_ids: set[int],
                 history: Optional[torch.Tensor] = None):
        self.request_id = request_id
        self.max_tokens = max_tokens  # generated ids at most (the stop id counts)
        self.stop_ids = stop_ids  # ids that end the sequence (kept in the output)
        self.history = history  # [1, n] long: what the repetition penalty sees (prompt ids + generated)
        self.finished = False
        self.cancelled = False
        self.outbox: collections.deque = collections.deque()

    def cancel(self) -> None:
        self.cancelled = True

    def append_token(self, token: int, generated: list[int]) -> tuple[bool, bool]:
        """Record a sampled id (in `generated` and the repetition-penalty history `self.history` [1, n]);
        -> (stop: a stop id, last: stop or `self.max_tokens` reached)."""
        generated.append(token)
        self.history = torch.cat([self.history, self.history.new_tensor([[token]])], dim=1)
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

    def on_prefill(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        raise NotImplementedError

    def next_input(self) -> Optional[tuple[torch.Tensor, "int | float"]]:  # (embed [H_in], position) or None
        raise NotImplementedError

    def has_input(self) -> bool:
        """Cheap check that next_input() would not be None (called from the event loop between steps)."""
        return self.next_input() is not None

    def on_step(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        raise NotImplementedError


class _BatchKV:
    """One left-padded DynamicCache for all rows, plus its 0/1 mask [B, T]."""

    def __init__(self, config):
        self.config = config
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, cache: DynamicCache, length: int, device) -> None:
        """Append one prefilled request's cache (batch 1, `length` real columns) as a new row."""
        new_mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache, new_mask
            return
        T = max(self.mask.shape[1], length)
        layers = []
        for old, new in zip(self.cache.layers, cache.layers):
            pad_old, pad_new = T - old.keys.shape[-2], T - new.keys.shape[-2]
            # keys/values: [b, kv_heads, t, head_dim]; pad dim -2 on the left
            k = torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
            v = torch.cat([F.pad(old.values, (0, 0, pad_old, 0)), F.pad(new.values, (0, 0, pad_new, 0))])
            layers.append((k, v))
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.config)
        self.mask = torch.cat([F.pad(self.mask, (T - self.mask.shape[1], 0)), F.pad(new_mask, (T - length, 0))])

    def select(self, keep: list[int]) -> None:
        if not keep:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]

    def compact(self, threshold: int) -> None:
        """Drop columns that are padding for every row (left padding after rows left, idle columns)."""
        live = self.mask.sum(0) > 0
        if int((~live).sum()) < threshold:
            return
        cols = torch.nonzero(live).flatten()
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
        self.mask = self.mask[:, cols]


@dataclass
class _Prefill:
    """A prompt being prefilled (it holds a slot): its inputs, its own cache, the hidden states of the chunks done."""
    seq: Sequence
    embeds: torch.Tensor  # [L, H_in]
    pos: torch.Tensor  # [3, L]
    kwargs: dict
    cache: DynamicCache
    done: int = 0  # prompt positions prefilled so far
    hidden: list = field(default_factory=list)  # [1, n, H] per chunk

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


class Engine:
    """Synchronous continuous-batching engine. Thread-compatible: `add` from any thread, `step` from one thread."""

    def __init__(self, model: DecoderModel, config: EngineConfig = EngineConfig(), name: str = "engine"):
        self.model, self.config, self.name = model, config, name
        self._pending: collections.deque = collections.deque()
        self._rows: list[Sequence] = []
        self._prefilling: list[_Prefill] = []  # started, not complete (chunked)
        self._kv = _BatchKV(model.config)
        self.num_steps = 0  # batched decode forwards so far
        self.num_prefills = 0
        self.num_prefill_chunks = 0  # prefill forwards (one per prompt without chunking)
        self.max_rows_seen = 0
        self.max_prefill_tokens_seen = 0  # most prompt tokens prefilled in one step

    # ------------------------------------------------------------------------------------------------ public
    def add(self, seq: Sequence) -> None:
        self._pending.append(seq)

    @property
    def num_running(self) -> int:
        """Requests holding a slot: decoding rows and prompts part-way through a chunked prefill."""
        return len(self._rows) + len(self._prefilling)

    def reset(self) -> None:
        """Drop every request (after a failed step: the batch's cache is in an unknown state); each is finished."""
        for s in list(self._rows) + [p.seq for p in self._prefilling] + list(self._pending):
            s.finished = True
        self._rows, self._pending, self._kv = [], collections.deque(), _BatchKV(self.model.config)
        self._prefilling = []

    def stats(self) -> dict:
        return {"steps": self.num_steps, "prefills": self.num_prefills, "running": self.num_running,
                "max_rows": self.max_rows_seen, "prefill_chunks": self.num_prefill_chunks,
                "max_prefill_tokens_per_step": self.max_prefill_tokens_seen}

    def waiting_rows(self) -> int:
        """Running rows that have no input yet (they would idle in this step)."""
        return sum(1 for s in self._rows if not (s.cancelled or s.finished or s.has_input()))

    def can_progress(self) -> bool:
        """True if a step would do something: a prefill, a decode, or dropping a cancelled request."""
        if self._prefilling or any(s.cancelled for s in self._pending):
            return True
        if self.num_running < self.config.max_num_seqs and any(s.ready_to_prefill() for s in self._pending):
            return True
        return any(s.cancelled or s.finished or s.has_input() for s in self._rows)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit what can be admitted, run one batched decode forward, retire finished rows.
        Returns the sequences that produced output (their outboxes grew)."""
        touched: list[Sequence] = []
        self._admit(touched)
        self._decode(touched)
        if self.model.after_step is not None and touched:
            self.model.after_step(touched)
        self._retire()
        return touched

    # ------------------------------------------------------------------------------------------------ internals
    def _admit(self, touched: list) -> None:
        """Prefill within this step's token budget: prompts part-way through first, then arrivals in order."""
        budget = self.config.max_prefill_tokens or math.inf
        used = 0
        for p in list(self._prefilling):
            if used >= budget:
                break
            if p.seq.cancelled:
                p.seq.finished = True
                self._prefilling.remove(p)
                continue
            if self._over_budget(p, used, budget):
                break
            used += self._prefill_chunk(p, budget - used, touched)
        waiting = collections.deque()
        while self._pending and used < budget:  # once the budget is spent the rest wait for the next step (FIFO)
            seq = self._pending.popleft()
            if seq.cancelled:
                seq.finished = True
                continue
            if self.num_running >= self.config.max_num_seqs or not seq.ready_to_prefill():
                waiting.append(seq)
                continue
            touched.append(seq)
            if seq.finished:  # it ended before its prefill (a Qwen3 Talker with nothing to say)
                continue
            try:
                embeds, pos, *extra = seq.prefill_inputs()  # [L, H_in], [3, L], optional forward kwargs
            except Exception as exc:  # this request's inputs are bad: fail it alone, the batch goes on
                seq.outbox.append(exc)
                seq.finished = True
                continue
            p = _Prefill(seq, embeds, pos, extra[0] if extra else {}, DynamicCache(config=self.model.config))
            self._prefilling.append(p)  # it holds its slot from here
            if self._over_budget(p, used, budget):  # a whole prompt past this step's budget: first in the next
                break
            used += self._prefill_chunk(p, budget - used, touched)
        self._pending.extendleft(reversed(waiting))  # the skipped ones keep their place before the rest
        self.max_prefill_tokens_seen = max(self.max_prefill_tokens_seen, used)

    def _over_budget(self, p: _Prefill, used: int, budget: float) -> bool:
        """Without chunking a prompt runs whole: past the budget it waits, unless it is the step's first."""
        return bool(used) and not self.config.prefill_chunk_tokens and used + p.length - p.done > budget

    def _prefill_chunk(self, p: _Prefill, allowance: float, touched: list) -> int:
        """One forward over the next chunk of `p`'s prompt (at most `allowance` tokens when chunking; the whole rest
        otherwise); on the last chunk the sequence sees its prefill and takes a row. -> prompt tokens run."""
        seq, L, a = p.seq, p.length, p.done
        n = L - a
        chunk = self.config.prefill_chunk_tokens
        kwargs = p.kwargs
        if chunk and n > 1:
            n = max(1, int(min(n, chunk, allowance)))
            if n < L - a or a > 0:
                kwargs = seq.prefill_chunk_kwargs(p.kwargs, a, a + n)
                if kwargs is None:  # this prompt cannot be chunked: the rest in one forward
                    if a > 0:
                        raise RuntimeError(f"{type(seq).__name__} refused a chunk after chunking began")
                    n, kwargs = L - a, p.kwargs
        if seq not in touched:
            touched.append(seq)
        try:
            mask = torch.ones(1, a + n, dtype=torch.long, device=self.model.device)
            hidden = self.model.forward(p.embeds[None, a:a + n], p.pos[:, None, a:a + n], mask, p.cache, **kwargs)
            p.hidden.append(hidden)
            p.done += n
            self.num_prefill_chunks += 1
            if p.done < L:
                return n
            self._prefilling.remove(p)
            hidden = p.hidden[0] if len(p.hidden) == 1 else torch.cat(p.hidden, dim=1)  # [1, L, H]
            p.hidden = []
            seq.on_prefill(hidden, self.model.head(hidden))
        except Exception as exc:  # this request's inputs are bad: fail it alone, the batch goes on
            if p in self._prefilling:
                self._prefilling.remove(p)
            seq.outbox.append(exc)
            seq.finished = True
            return n
        self.num_prefills += 1
        if not seq.finished:
            self._kv.add(p.cache, L, self.model.device)
            self._rows.append(seq)
        return n

    def _decode(self, touched: list) -> None:
        inputs = [None if (s.finished or s.cancelled) else s.next_input() for s in self._rows]
        active = [i for i, x in enumerate(inputs) if x is not None]
        if not active:
            return
        B, H = len(self._rows), next(x for x in inputs if x is not None)[0].shape[-1]
        dev = self.model.device
        x = torch.zeros(B, 1, H, device=dev, dtype=inputs[active[0]][0].dtype)
        # M-RoPE positions are integers for Qwen2.5, float32 for Qwen3 (video time steps of seconds_per_grid * 13)
        fractional = any(isinstance(inputs[i][1], float) for i in active)
        pos = torch.ones(3, B, 1, dtype=torch.float32 if fractional else torch.long, device=dev)
        col = torch.zeros(B, 1, dtype=torch.long, device=dev)
        for i in active:
            emb, p = inputs[i]
            x[i, 0], pos[:, i, 0], col[i, 0] = emb, p, 1
        self._kv.mask = torch.cat([self._kv.mask, col], dim=1)
        hidden = self.model.forward(x, pos, self._kv.mask, self._kv.cache)  # [B, 1, H]
        logits = self.model.head(hidden)  # [B, V]
        self.num_steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(active))
        for i in active:
            seq = self._rows[i]
            seq.on_step(hidden[i:i + 1, 0], logits[i:i + 1])
            touched.append(seq)

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self._rows) if not (s.finished or s.cancelled)]
        for i, s in enumerate(self._rows):
            if s.cancelled:
                s.finished = True
        if len(keep) != len(self._rows):
            self._kv.select(keep)
            self._rows = [self._rows[i] for i in keep]
        if self._rows:
            self._kv.compact(self.config.max_dead_columns)


class EngineLoop(WorkerLoop):
    """Runs an Engine in one worker thread, driven from an asyncio loop. `submit(seq)` returns an async iterator over
    the sequence's outputs; breaking out of it (or cancelling the consuming task) cancels the sequence, which frees
    its slot at the next step boundary. A step that raises fails every sequence the engine holds and resets it."""

    def __init__(self, engine: Engine):
        super().__init__(engine.name)
        self.engine = engine
        self._seqs: dict[int, Sequence] = {}

    def _next_work(self):
        return True if self.engine.can_progress() else None

    async def _gather(self, work):
        """With `batch_wait_s`, wait (briefly) for running rows whose input is not there yet, so that rows fed by
        one upstream step share one forward."""
        wait = self.engine.config.batch_wait_s
        if wait <= 0 or not self.engine.waiting_rows() or any(s.urgent for s in self.engine._rows):
            return work
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.engine.waiting_rows() and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        return work

    def _step(self, work) -> list[Sequence]:
        return self.engine.step()

    def _ready_keys(self) -> list[int]:
        """Requests the next step would serve: pending ones ready to prefill, running ones with their input."""
        e = self.engine
        pending = [s for s in e._pending if not s.cancelled and s.ready_to_prefill()][:max(0, e.config.max_num_seqs -
                                                                                              e.num_running)]
        return ([id(p.seq) for p in e._prefilling] + [id(s) for s in pending] +
                [id(s) for s in e._rows if not (s.cancelled or s.finished) and s.has_input()])

    def _load(self) -> tuple[int, int]:
        """(rows in the batch, requests ready to prefill or part-way through their prefill)."""
        e = self.engine
        return len(e._rows), len(e._prefilling) + sum(1 for s in e._pending if not s.cancelled and s.ready_to_prefill())

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
