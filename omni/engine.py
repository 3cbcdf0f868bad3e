"""The decode engine shared by the Thinker and the Talker: continuous batching over a transformers decoder fed with
`inputs_embeds` and explicit 3-D (M-RoPE) positions, which transformers' own continuous batching cannot take.

Requests join and leave a running batch at step boundaries. Each request owns a slot of a preallocated KV cache
(omni/kv.py): a prompt is prefilled alone (bit-identical to the official path) and its KV written into a free slot;
a decode step writes one position per row in place and attends over a view of the storage; a finished request frees
its slot without a copy. Admission is bounded by KV memory: a request reserves prompt + max_tokens positions; one that
does not fit now waits (past `max_waiting` waiting requests: StageUnavailable, a 503), one that could never fit is an
InvalidRequest naming `kv_cache_tokens`. An out-of-memory error fails the request that caused it (the prefill's, or
the newest row's in a decode step), never the batch.

So that arrivals do not stall the running decodes, a step prefills at most `max_prefill_tokens` prompt tokens (whole
prompts, first come first served; the first always goes) and, with `prefill_chunk_tokens`, a long prompt is
prefilled that many tokens per step over its own growing cache, between the decode steps (attention over the earlier
chunks' cache: the same computation in other kernel shapes, logits within ~1e-6, tokens equal in the golden tests).
Every decode step is one batched forward over the slots in use; a row whose next input is not known yet (a Talker
waiting for its Thinker) idles: its query is computed and dropped, its length does not advance. Positions are each
row's solo positions, so a row computes what it computes alone (tokens equal; logits within ~1e-7, from
batch-size-dependent matmul kernels).

Sampling runs on the device for the whole step (omni/sampling.py); the step's ids come to the host in one transfer
(one more in a step that completes prefills). `compile=True` runs the decode forward through `torch.compile`
(CUDA graphs via mode="reduce-overhead" on CUDA), with the batch rounded up to a power of two and the attended
length to a multiple of 64 so that few shapes are compiled.

Stage-specific logic lives in `Sequence` subclasses (omni/thinker.py, omni/talker.py); the engine knows nothing of
text or speech. The engine is synchronous and single-threaded; `EngineLoop` (omni/engine_loop.py) runs it in a worker
thread for asyncio.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import DynamicCache

from omni.engine_config import EngineConfig  # re-exported: configs and stages import it from here
from omni.engine_loop import EngineLoop  # re-exported: the stages import it from here
from omni.kv import SlotKV, StepCache, kv_bytes_per_token, memory_budget_tokens
from omni.sampling import Sampler, sample_rows
from omni.sequence import Sequence
from omni.types import InvalidRequest, StageUnavailable

__all__ = ["DecoderModel", "Sequence", "Engine", "EngineConfig", "EngineLoop", "Sampler"]

T_BUCKET = 64  # compile: attended lengths rounded up to a multiple of this (one compiled shape per 64 positions)


@dataclass
class DecoderModel:
    """How to run one decoder: forward(embeds [B, T, H_in], positions [3, B, T], mask, cache, **prefill kwargs) ->
    hidden [B, T, H], where mask is [B, kv + T] 0/1 with a DynamicCache (prefill) or a [B, 1, 1, kv] bool mask with
    the slot cache's StepCache (decode); head(hidden [B, T, H]) -> float logits [B, V] of the last position; config
    (a decoder config: layers, heads, head_dim) and dtype size the KV budget. `after_step(seqs)`, when set, runs once
    per engine step on the sequences that produced output (a batched post-step such as Qwen3's code predictor)."""

    forward: Callable
    head: Callable
    config: object
    device: torch.device
    after_step: Optional[Callable] = None
    dtype: Optional[torch.dtype] = None  # the KV's dtype (the model's); None: float32


@dataclass
class _Prefill:
    """A prompt being prefilled (it holds a slot): its inputs, its own cache, the hidden states of the chunks done."""

    seq: Sequence
    embeds: torch.Tensor  # [L, H_in]
    pos: torch.Tensor  # [3, L]
    kwargs: dict
    cache: Optional[DynamicCache] = None
    done: int = 0  # prompt positions prefilled so far
    hidden: list = field(default_factory=list)  # [1, n, H] per chunk

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


@dataclass
class _Output:
    """A forward's output for one sequence, waiting for its sampled id."""

    seq: Sequence
    hidden: torch.Tensor  # [1, L, H] (prefill) or [1, H] (decode)
    logits: torch.Tensor  # [1, V]
    prefill: Optional[_Prefill] = None  # set for a completed prefill


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Engine:
    """Synchronous continuous-batching engine. Thread-compatible: `add` from any thread, `step` from one thread; the
    readers (`ready_sequences`, `load`, `waiting_rows`, `has_urgent_row`) may run in another thread during a step."""

    def __init__(self, model: DecoderModel, config: Optional[EngineConfig] = None, name: str = "engine"):
        self.model, self.config, self.name = model, config or EngineConfig(), name
        self._pending: collections.deque = collections.deque()
        self._rows: list[Sequence] = []  # sequences holding a slot and decoding
        self._prefilling: list[_Prefill] = []  # started, not complete (chunked)
        dtype = model.dtype or torch.float32
        self.kv_bytes_per_token = kv_bytes_per_token(model.config, dtype)
        self.kv_budget_tokens = config.kv_cache_tokens or memory_budget_tokens(
            self.kv_bytes_per_token, torch.device(model.device), config.gpu_memory_utilization
        )
        self.kv = SlotKV(config.max_num_seqs, self.kv_budget_tokens, model.device)
        self._compiled: Optional[Callable] = None  # the decode forward through torch.compile (config.compile)
        self._order = itertools.count()  # admission order (the newest row fails first on an out-of-memory step)
        self.num_steps = 0  # batched decode forwards so far
        self.num_prefills = 0
        self.num_prefill_chunks = 0  # prefill forwards (one per prompt without chunking)
        self.max_rows_seen = 0
        self.max_prefill_tokens_seen = 0  # most prompt tokens prefilled in one step
        self.host_syncs = 0  # transfers of sampled ids to the host (one per step, one more with prefills)
        self.oom_failures = 0  # requests failed by an out-of-memory error

    # ------------------------------------------------------------------------------------------------ public
    def add(self, seq: Sequence) -> None:
        """Queue a request; StageUnavailable (a 503) when `max_waiting` requests already wait."""
        if self.config.max_waiting and len(self._pending) >= self.config.max_waiting:
            raise StageUnavailable(
                f"the {self.name} is full: {len(self._pending)} requests wait for a slot or KV "
                f"room (max_waiting); retry later"
            )
        self._pending.append(seq)

    def check_fits(self, tokens: int, what: str = "the request") -> None:
        """InvalidRequest (a 400) when `tokens` KV positions exceed the whole budget: such a request never runs."""
        if not self.kv.fits_ever(tokens):
            raise InvalidRequest(
                f"{what} needs {tokens} KV positions (prompt + max_tokens), more than the "
                f"{self.name}'s KV budget of {self.kv_budget_tokens} (kv_cache_tokens)",
                "max_tokens",
                "context_length_exceeded",
            )

    @property
    def num_running(self) -> int:
        """Requests holding a slot: decoding rows and prompts part-way through a chunked prefill."""
        return len(self._rows) + len(self._prefilling)

    def reset(self) -> None:
        """Drop every request (after a failed step); each is finished."""
        for s in list(self._rows) + [p.seq for p in self._prefilling] + list(self._pending):
            s.finished = True
        self._rows, self._pending, self._prefilling = [], collections.deque(), []
        self.kv = SlotKV(self.config.max_num_seqs, self.kv_budget_tokens, self.model.device)

    def stats(self) -> dict:
        return {
            "steps": self.num_steps,
            "prefills": self.num_prefills,
            "running": self.num_running,
            "max_rows": self.max_rows_seen,
            "prefill_chunks": self.num_prefill_chunks,
            "max_prefill_tokens_per_step": self.max_prefill_tokens_seen,
            "host_syncs": self.host_syncs,
            "kv_budget_tokens": self.kv_budget_tokens,
            "kv_slots": self.kv.slots,
            "kv_capacity": self.kv.capacity,
            "kv_bytes": self.kv.nbytes(),
            "kv_grows": self.kv.grows,
            "oom_failures": self.oom_failures,
        }

    def waiting_rows(self) -> int:
        """Running rows that have no input yet (they would idle in this step)."""
        return sum(1 for s in self._rows if not (s.cancelled or s.finished or s.has_input()))

    def has_urgent_row(self) -> bool:
        """A running row asks for its step now (no batching wait)."""
        return any(s.urgent for s in self._rows)

    def ready_sequences(self) -> list[Sequence]:
        """The requests the next step would serve: prompts part-way through a prefill, pending ones ready to start
        (as many as free rows allow), running rows whose input is there."""
        free = max(0, self.config.max_num_seqs - self.num_running)
        pending = [s for s in self._waiting() if not s.cancelled and self.ready(s)][:free]
        return (
            [p.seq for p in self._prefilling]
            + pending
            + [s for s in self._rows if not (s.cancelled or s.finished) and s.has_input()]
        )

    def load(self) -> tuple[int, int]:
        """(rows in the batch, requests ready to prefill or part-way through their prefill)."""
        return len(self._rows), len(self._prefilling) + sum(
            1 for s in self._waiting() if not s.cancelled and self.ready(s)
        )

    def _waiting(self) -> tuple[Sequence, ...]:
        """The pending requests now, for a reader in another thread than `step`'s (the event loop's accounting and
        stats, during a step): iterating the deque itself there raised "deque mutated during iteration" whenever the
        step admitted a request meanwhile (its popleft), and failed the caller's stream. The copy runs in C, under the
        GIL; a thread switch inside it (a finalizer that runs Python code) makes it copy again."""
        while True:
            try:
                return tuple(self._pending)
            except RuntimeError:
                continue

    def ready(self, seq: Sequence) -> bool:
        """A pending sequence can start its prefill (its inputs are there)."""
        return seq.prepared is not None or seq.ready_to_prefill()

    def can_progress(self) -> bool:
        """True if a step would do something: a prefill, a decode, or dropping a cancelled request."""
        if self._prefilling or any(s.cancelled for s in self._pending):
            return True
        if self.num_running < self.config.max_num_seqs and self._pending_head_ready():
            return True
        return any(s.cancelled or s.finished or s.has_input() for s in self._rows)

    def _admissible(self, seq: Sequence) -> bool:
        p = seq.prepared
        return (
            p is None
            or self.kv.can_reserve(p.length + seq.max_tokens)
            or not self.kv.fits_ever(p.length + seq.max_tokens)
        )

    def _pending_head_ready(self) -> bool:
        """Some pending request can be served now: the first one with inputs, if it has KV room (FIFO)."""
        for s in self._pending:
            if s.cancelled:
                return True
            if self.ready(s):
                return self._admissible(s)
        return False

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

    # ------------------------------------------------------------------------------------------------ admission
    def _admit(self, touched: list) -> None:
        """Prefill within this step's token budget: prompts part-way through first, then arrivals in order (an
        arrival without KV room stops the arrivals: first come, first served)."""
        budget = self.config.max_prefill_tokens or math.inf
        used = 0
        done: list[_Output] = []
        for p in list(self._prefilling):
            if used >= budget:
                break
            if p.seq.cancelled:
                self._drop_prefill(p)
                continue
            if self._over_budget(p, used, budget):
                break
            used += self._prefill_chunk(p, budget - used, touched, done)
        waiting = collections.deque()
        while self._pending and used < budget:  # once the budget is spent the rest wait for the next step (FIFO)
            seq = self._pending.popleft()
            if seq.cancelled:
                seq.finished = True
                continue
            if self.num_running >= self.config.max_num_seqs or not self.ready(seq):
                waiting.append(seq)
                continue
            if seq.finished:  # it ended before its prefill (a Qwen3 Talker with nothing to say)
                touched.append(seq)
                continue
            p = seq.prepared or self._prepare(seq, touched)
            if p is None:
                continue
            tokens = p.length + seq.max_tokens
            try:
                self.check_fits(tokens)
            except InvalidRequest as exc:
                self._fail(seq, exc, touched)
                continue
            if not self.kv.can_reserve(tokens):  # no room now: it waits, and so do the ones after it
                seq.prepared = p
                waiting.append(seq)
                break
            try:
                seq.slot = self.kv.reserve(tokens)
            except Exception as exc:  # growing the storage failed (out of memory): this request alone fails
                self.oom_failures += _is_oom(exc)
                self._fail(seq, exc, touched)
                continue
            seq.prepared, seq._order = None, next(self._order)
            p.cache = DynamicCache(config=self.model.config)
            self._prefilling.append(p)  # it holds its slot from here
            if self._over_budget(p, used, budget):  # a whole prompt past this step's budget: first in the next
                break
            used += self._prefill_chunk(p, budget - used, touched, done)
        self._pending.extendleft(reversed(waiting))  # the skipped ones keep their place before the rest
        self.max_prefill_tokens_seen = max(self.max_prefill_tokens_seen, used)
        self._emit(done, touched)

    def _prepare(self, seq: Sequence, touched: list) -> Optional[_Prefill]:
        try:
            embeds, pos, *extra = seq.prefill_inputs()  # [L, H_in], [3, L], optional forward kwargs
        except Exception as exc:  # this request's inputs are bad: fail it alone, the batch goes on
            self._fail(seq, exc, touched)
            return None
        return _Prefill(seq, embeds, pos, extra[0] if extra else {})

    def _fail(self, seq: Sequence, exc: Exception, touched: list) -> None:
        seq.outbox.append(exc)
        seq.finished = True
        if seq.slot is not None:
            self.kv.release(seq.slot)
            seq.slot = None
        if seq not in touched:
            touched.append(seq)

    def _drop_prefill(self, p: _Prefill) -> None:
        self._prefilling.remove(p)
        p.seq.finished = True
        if p.seq.slot is not None:
            self.kv.release(p.seq.slot)
            p.seq.slot = None

    def _over_budget(self, p: _Prefill, used: int, budget: float) -> bool:
        """Without chunking a prompt runs whole: past the budget it waits, unless it is the step's first."""
        return bool(used) and not self.config.prefill_chunk_tokens and used + p.length - p.done > budget

    def _prefill_chunk(self, p: _Prefill, allowance: float, touched: list, done: list) -> int:
        """One forward over the next chunk of `p`'s prompt (at most `allowance` tokens when chunking; the whole rest
        otherwise); the last chunk's output joins `done` (sampled after this step's prefills). -> tokens run."""
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
            hidden = self.model.forward(p.embeds[None, a : a + n], p.pos[:, None, a : a + n], mask, p.cache, **kwargs)
            p.hidden.append(hidden)
            p.done += n
            self.num_prefill_chunks += 1
            if p.done < L:
                return n
            self._prefilling.remove(p)
            hidden = p.hidden[0] if len(p.hidden) == 1 else torch.cat(p.hidden, dim=1)  # [1, L, H]
            p.hidden = []
            logits = self.model.head(hidden)
            self.kv.write_prompt(seq.slot, [(layer.keys, layer.values) for layer in p.cache.layers])
            p.cache = None  # the prompt's KV lives in the slot now
        except Exception as exc:  # this request's inputs are bad, or it ran out of memory: it fails alone
            if p in self._prefilling:
                self._prefilling.remove(p)
            self.oom_failures += _is_oom(exc)
            self._fail(seq, exc, touched)
            return n
        self.num_prefills += 1
        done.append(_Output(seq, hidden, logits, p))
        return n

    # ------------------------------------------------------------------------------------------------ outputs
    def _emit(self, outs: list[_Output], touched: list) -> None:
        """Sample every output's id on the device, bring the ids to the host at once, hand each to its sequence."""
        if not outs:
            return
        sampled = [o for o in outs if o.prefill is None or o.seq.samples_prefill]
        ids_dev = sample_rows(
            [o.seq.sampler for o in sampled], [o.seq.history for o in sampled], [o.logits for o in sampled]
        )
        ids = ids_dev.tolist() if sampled else []  # the step's host transfer
        self.host_syncs += bool(sampled)
        token = {id(o): (ids[i], ids_dev[i : i + 1]) for i, o in enumerate(sampled)}
        for o in outs:
            seq = o.seq
            tok, seq.last_token = token.get(id(o), (None, None))
            if o.prefill is None:
                seq.on_step(o.hidden, tok)
                continue
            try:
                seq.on_prefill(o.hidden, tok)
            except Exception as exc:
                self._fail(seq, exc, touched)
                continue
            if seq.finished:
                self.kv.release(seq.slot)
                seq.slot = None
            else:
                self._rows.append(seq)

    # ------------------------------------------------------------------------------------------------ decode
    def _decode(self, touched: list) -> None:
        inputs = {id(s): s.next_input() for s in self._rows if not (s.finished or s.cancelled)}
        active = [s for s in self._rows if inputs.get(id(s)) is not None]
        if not active:
            return
        kv, dev = self.kv, self.model.device
        by_slot = {s.slot: s for s in active}
        rows = kv.hi
        t = max(kv.lengths[s.slot] for s in active) + 1  # attended positions: the longest row's, with its new one
        if self.config.compile:  # few shapes: rows to a power of two, positions to a multiple of T_BUCKET
            rows = min(kv.slots, 1 << (rows - 1).bit_length())
            t = min(kv.capacity, -(-t // T_BUCKET) * T_BUCKET)
            kv.clean_rows(rows)  # the bucket's spare rows are dummies: finite values
        first = inputs[id(active[0])][0]
        zero = torch.zeros_like(first)
        embeds, cols, pos = [], [], []
        fractional = False
        for r in range(rows):
            s = by_slot.get(r)
            length = kv.lengths[r] if r < len(kv.lengths) else 0
            if s is None:  # a free slot or an idle row: a dummy query, written where the row's next position is
                embeds.append(zero)
                cols.append(length)
                pos.append(0)
                continue
            emb, p = inputs[id(s)]
            embeds.append(emb)
            cols.append(length)
            pos.append(p)
            fractional |= isinstance(p, float)
        # one upload per step: [2, rows] = write positions, M-RoPE positions (float32 for Qwen3's fractional ones)
        meta = torch.tensor([cols, pos], dtype=torch.float32 if fractional else torch.long)
        meta = meta.pin_memory() if torch.device(dev).type == "cuda" else meta
        meta = meta.to(dev, non_blocking=True)
        cols_dev = meta[0].long()
        positions = meta[1].view(1, rows, 1).expand(3, rows, 1)  # [3, rows, 1], all three axes alike
        x = torch.stack(embeds)[:, None]  # [rows, 1, H_in]
        mask = (torch.arange(t, device=dev)[None] <= cols_dev[:, None])[:, None, None, :]  # [rows, 1, 1, t]
        try:
            hidden = self._decode_forward()(x, positions, mask, StepCache(kv, rows, cols_dev, t))  # [rows, 1, H]
            logits = self.model.head(hidden)  # [rows, V]
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if torch.device(dev).type == "cuda":
                torch.cuda.empty_cache()
            newest = max(active, key=lambda s: s._order)  # nothing was committed: the others retry next step
            self.oom_failures += 1
            self._fail(newest, exc, touched)
            return
        self.num_steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(active))
        for s in active:
            kv.lengths[s.slot] += 1
        outs = [_Output(s, hidden[s.slot : s.slot + 1, 0], logits[s.slot : s.slot + 1]) for s in active]
        for s in active:
            if s not in touched:
                touched.append(s)
        self._emit(outs, touched)

    def _decode_forward(self) -> Callable:
        if not self.config.compile:
            return self.model.forward
        if self._compiled is None:  # compiled at the first decode (a stage may wrap its forward after __init__)
            mode = "reduce-overhead" if torch.device(self.model.device).type == "cuda" else None
            self._compiled = torch.compile(self.model.forward, mode=mode, dynamic=True)
        return self._compiled

    def _retire(self) -> None:
        keep = []
        for s in self._rows:
            if s.cancelled:
                s.finished = True
            if s.finished:
                if s.slot is not None:
                    self.kv.release(s.slot)
                    s.slot = None
            else:
                keep.append(s)
        self._rows = keep
