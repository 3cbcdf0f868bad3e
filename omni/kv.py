"""The engine's KV cache: one preallocated K and V tensor per layer, [slots, kv_heads, capacity, head_dim], where each
running request owns a slot (a row) and its positions 0 .. length-1.

- Admission writes the new request's prompt KV into a free slot (its own row only); retiring a request marks its
  slot free (no copy; the next owner overwrites it). A decode step writes one position per row, in place.
- Attention reads the view [:hi, :, :t] (hi: one past the highest busy slot, t: one past the longest row), so a step
  reads only the rows and positions in use and copies nothing. Shorter rows are masked past their length.
- Memory is bounded by a budget in tokens (`slots x capacity <= budget`). A request reserves its prompt plus its
  max_tokens at admission, so a running request never runs out of room; one that does not fit now waits, one that
  could never fit is refused (`fits_ever`).
- The geometry is chosen when the first request arrives at an empty engine: a capacity for its reservation (a power
  of two within the budget) and as many rows as the budget holds at it (up to max_num_seqs); a longer request later
  grows the capacity if the budget allows (one copy), else waits until the engine empties, when the storage is
  dropped and the next request chooses again. In steady state admission, decode and retirement allocate nothing
  that scales with the batch's KV.
Rows in use hold zeros or a former owner's finite values where unwritten: masked positions contribute exactly 0.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from transformers import Cache

__all__ = ["SlotKV", "StepCache", "kv_bytes_per_token", "memory_budget_tokens"]

MIN_CAPACITY = 64  # positions per slot at the first allocation


def kv_bytes_per_token(config, dtype: torch.dtype) -> Optional[int]:
    """K and V bytes one token takes over all layers of a decoder config; None if the config does not say."""
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError):
        return None
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def memory_budget_tokens(bytes_per_token: Optional[int], device: torch.device, share: float) -> int:
    """Tokens of KV that `share` of the device's free memory holds now (host memory on CPU)."""
    if not bytes_per_token:
        return 1 << 40  # unknown shape: no bound
    return max(1, int(_free_bytes(device) * share) // bytes_per_token)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


class SlotKV:
    """Slot storage for one engine. `reserve(tokens)` -> a slot (growing the storage if needed), `write_prompt`,
    `release`; `lengths[slot]` tokens held per slot (host ints, the engine's bookkeeping)."""

    def __init__(self, max_slots: int, budget_tokens: int, device):
        self.max_slots = max_slots  # rows at most (EngineConfig.max_num_seqs)
        self.budget = budget_tokens  # slots x capacity at most
        self.device = torch.device(device)
        self.keys: list[torch.Tensor] = []  # per layer [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.slots = 0  # allocated rows
        self.capacity = 0  # allocated positions per row
        self.lengths: list[int] = []  # per allocated slot: positions written
        self.reserved: list[int] = []  # per allocated slot: positions reserved (0: free)
        self.grows = 0  # storage (re)allocations, each a copy of the KV held then
        self._layout: Optional[tuple] = None  # (layers, kv_heads, head_dim, dtype), from the first prompt
        self._clean = 0  # rows [0, _clean) hold finite values

    # ------------------------------------------------------------------------------------------------ geometry
    @property
    def hi(self) -> int:
        """One past the highest busy slot: the rows a decode step runs."""
        for i in range(len(self.reserved) - 1, -1, -1):
            if self.reserved[i]:
                return i + 1
        return 0

    @property
    def busy(self) -> int:
        return sum(1 for r in self.reserved if r)

    def _free_slot(self) -> int:
        for i, r in enumerate(self.reserved):
            if not r:
                return i
        return len(self.reserved)

    def _geometry(self, tokens: int) -> Optional[tuple[int, int]]:
        """(slots, capacity) the storage needs to give a new request `tokens` positions; None if it must wait.
        From empty: capacity for `tokens` (a power of two where the budget allows) and as many rows as the budget
        holds at it (up to max_slots), so that later admissions find their row allocated. Later: the rows stay;
        the capacity grows (one copy) if a longer request fits the budget with them, else the request waits (the
        geometry is chosen anew when the engine empties)."""
        caps = [_pow2(max(tokens, MIN_CAPACITY)), -(-tokens // 16) * 16, tokens]
        if self.slots == 0:  # the largest capacity that still gives every row, else the most rows there can be
            for cap in caps:
                if self.budget // cap >= self.max_slots:
                    return self.max_slots, cap
            for cap in caps[1:]:
                if self.budget // cap >= 1:
                    return self.budget // cap, cap
            return None
        if self._free_slot() >= self.slots:
            return None
        if tokens <= self.capacity:
            return self.slots, self.capacity
        for cap in caps:
            if self.slots * cap <= self.budget:
                return self.slots, cap
        return None

    def fits_ever(self, tokens: int) -> bool:
        """A request of `tokens` positions fits the budget when it runs alone."""
        return tokens <= self.budget

    def can_reserve(self, tokens: int) -> bool:
        return self._geometry(tokens) is not None

    # ------------------------------------------------------------------------------------------------ slots
    def reserve(self, tokens: int) -> int:
        """A free slot with room for `tokens` positions (grows the storage if needed; may raise OutOfMemoryError)."""
        geo = self._geometry(tokens)
        if geo is None:
            raise RuntimeError(f"no room for {tokens} KV positions (check can_reserve first)")
        if geo != (self.slots, self.capacity):
            if self.keys:
                self._grow(*geo)
            else:  # nothing allocated yet: the first prompt's KV tells the layer shapes
                self.slots, self.capacity = geo
        slot = self._free_slot()
        while len(self.reserved) <= slot:
            self.reserved.append(0)
            self.lengths.append(0)
        self.reserved[slot], self.lengths[slot] = tokens, 0
        self.clean_rows(slot + 1)
        return slot

    def clean_rows(self, rows: int) -> None:
        """Rows below `rows` hold finite values (zeroed once since the allocation; a former owner's are finite):
        a masked position contributes exactly 0 only if its value is finite. On the CPU the storage is allocated
        uninitialised, so memory is touched only for the rows in use."""
        if self.keys and self._clean < rows:
            for K, V in zip(self.keys, self.values):
                K[self._clean : rows].zero_()
                V[self._clean : rows].zero_()
        if self.keys:
            self._clean = max(self._clean, rows)

    def write_prompt(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The prompt KV of one request, per layer (keys, values) [1, kv_heads, L, head_dim], into `slot`."""
        if not self.keys:
            k0 = layers[0][0]
            self._layout = (len(layers), k0.shape[1], k0.shape[3], k0.dtype)
            self._grow(self.slots, self.capacity)
            self.clean_rows(len(self.reserved))
        L = layers[0][0].shape[2]
        for (k, v), K, V in zip(layers, self.keys, self.values):
            K[slot, :, :L] = k[0]
            V[slot, :, :L] = v[0]
        self.lengths[slot] = L

    def release(self, slot: int) -> None:
        self.reserved[slot], self.lengths[slot] = 0, 0
        while self.reserved and not self.reserved[-1]:
            self.reserved.pop()
            self.lengths.pop()
        if not self.reserved:  # the engine is empty: give the memory back; the next request allocates afresh
            self.keys, self.values, self.slots, self.capacity = [], [], 0, 0
            self._layout, self._clean = None, 0

    def _grow(self, slots: int, capacity: int) -> None:
        """Allocate the storage at (slots, capacity), keeping what the old one held (a copy: rare). Zeroed on CUDA
        (committed memory anyway); uninitialised on the CPU, rows zeroed as they are first used (`clean_rows`)."""
        assert self._layout is not None, "_grow before the first prompt set the layout"
        n_layers, kv_heads, head_dim, dtype = self._layout
        old_k, old_v = self.keys, self.values
        old_s, old_c = (old_k[0].shape[0], old_k[0].shape[2]) if old_k else (0, 0)
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self.keys, self.values = [], []
        for i in range(n_layers):
            k = alloc(slots, kv_heads, capacity, head_dim, dtype=dtype, device=self.device)
            v = alloc(slots, kv_heads, capacity, head_dim, dtype=dtype, device=self.device)
            if old_k:
                k[:old_s, :, :old_c] = old_k[i]
                v[:old_s, :, :old_c] = old_v[i]
                k[:old_s, :, old_c:] = 0
                v[:old_s, :, old_c:] = 0
            self.keys.append(k)
            self.values.append(v)
        self._clean = slots if self.device.type == "cuda" else min(self._clean, old_s)
        self.slots, self.capacity = slots, capacity
        self.grows += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class StepCache(Cache):
    """What the model's attention layers see in one decode step: `update` writes each row's new K/V at its own
    position (`cols` [rows] long, on the device) and returns the view [:rows, :, :t] of the slot storage."""

    def __init__(self, kv: SlotKV, rows: int, cols: torch.Tensor, t: int):
        super().__init__(layers=[])
        self.kv, self.rows, self.cols, self.t = kv, rows, cols, t
        self.row_index = torch.arange(rows, device=cols.device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states / value_states: [rows, kv_heads, 1, head_dim]
        K, V = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        K[self.row_index, :, self.cols] = key_states[:, :, 0]
        V[self.row_index, :, self.cols] = value_states[:, :, 0]
        return K[: self.rows, :, : self.t], V[: self.rows, :, : self.t]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.t - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.t, 0

    @property
    def is_compileable(self) -> bool:
        return False
