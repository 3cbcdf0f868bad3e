"""Sampling on the device: every request's next id is drawn where its logits are, and a step's ids come to the host
in one transfer (`sample_rows` -> one tensor, `.tolist()` once by the engine).

Per request, in the order transformers' `generate` applies it: repetition penalty, suppressed tokens, then (when
sampling) temperature, top-k, top-p; a per-request `torch.Generator` (never the global RNG), so a request draws the
same numbers alone or batched, and the same as the official sampled generate seeded alike. Greedy requests with no
logits processor share one batched argmax.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Optional

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omni.types import SamplingParams

__all__ = ["Sampler", "TokenHistory", "sample_rows"]


class Sampler:
    """One request's sampling: `sample(history, logits)` -> the next id as a device tensor [1] (no host sync);
    calling it returns the id as an int (one sync)."""

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
        self.plain_greedy = params.greedy and not procs  # the argmax of the raw logits: batched with its kind
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, history: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """history [1, n] long (what the repetition penalty sees), logits [1, V] float -> the next id, long [1]."""
        scores = self.processors(history, logits) if len(self.processors) else logits
        if self.generator is None:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def __call__(self, history: Optional[torch.Tensor], logits: torch.Tensor) -> int:
        return int(self.sample(history, logits))


class TokenHistory:
    """What the repetition penalty sees (prompt ids, then the generated ones), in one preallocated device buffer:
    appending an id sampled on the device is a device-to-device write, never a host round trip."""

    def __init__(self, ids: torch.Tensor, room: int):
        # ids: [1, n] long; room: ids that may still be appended
        n = ids.shape[1]
        self._buf = torch.empty(1, n + max(1, room), dtype=torch.long, device=ids.device)
        self._buf[:, :n] = ids
        self.length = n

    @property
    def ids(self) -> torch.Tensor:  # [1, length]
        return self._buf[:, : self.length]

    def append(self, token: torch.Tensor | int) -> None:
        """token: long [1] (device) or an int."""
        if self.length == self._buf.shape[1]:  # past the room it was made with (never in the engine): grow
            self._buf = torch.cat([self._buf, torch.empty_like(self._buf)], dim=1)
        self._buf[0, self.length] = token if isinstance(token, int) else token.reshape(())
        self.length += 1


def sample_rows(
    samplers: Seq[Sampler], histories: Seq[Optional[torch.Tensor]], logits: Seq[torch.Tensor]
) -> torch.Tensor:
    """One id per row, on the device: samplers[i] over logits[i] [1, V] with histories[i] [1, n]. -> long [n_rows].
    Rows whose sampler is a plain argmax are batched in one call when their logits have one width."""
    n = len(samplers)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    if all(s.plain_greedy for s in samplers) and len({x.shape[-1] for x in logits}) == 1:
        return torch.cat(list(logits)).argmax(-1)
    return torch.cat([s.sample(h, x) for s, h, x in zip(samplers, histories, logits)])
