"""The decode engine's settings (omni/engine.py): batch rows, prefill budget and chunking, the KV budget, waiting bound,
compile. Validated at construction, so a bad serve config fails at start with the field named."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # rows in the running batch at most; more requests wait for a free slot
    max_dead_columns: int = 64  # unused since the slot KV cache (it has no padding columns); accepted in configs
    batch_wait_s: float = 0.0  # when some running rows wait for input (a Talker behind its Thinker), wait this long
    #                            for them before stepping, so the rows fed by one upstream step share one forward
    max_prefill_tokens: int = 8192  # prompt tokens prefilled per step at most (the first prompt or chunk always goes;
    #                                 the rest wait for the next step, after a decode); 0: no limit
    prefill_chunk_tokens: int = 0  # > 0: a longer prompt is prefilled this many tokens per step, interleaved with the
    #                                decode steps; 0: every prompt in one forward (bit-identical to the official path)
    kv_cache_tokens: int = 0  # KV budget in token positions (slots x positions per slot); a request reserves its
    #                           prompt + max_tokens. 0: computed at start from the free device memory (host memory on
    #                           CPU) x gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # share of the free memory the KV may take when kv_cache_tokens is 0
    max_waiting: int = 0  # requests waiting for a slot or KV room at most; one more is refused (503); 0: no bound
    compile: bool = False  # torch.compile the decode step (mode "reduce-overhead", i.e. CUDA graphs, on CUDA)

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_dead_columns < 1:
            raise ValueError(
                f"max_num_seqs and max_dead_columns must be >= 1, got {self.max_num_seqs}, {self.max_dead_columns}"
            )
        if self.max_prefill_tokens < 0 or self.prefill_chunk_tokens < 0:
            raise ValueError(
                f"max_prefill_tokens and prefill_chunk_tokens must be >= 0, got "
                f"{self.max_prefill_tokens}, {self.prefill_chunk_tokens}"
            )
        if not 0 <= self.batch_wait_s <= 1:
            raise ValueError(f"batch_wait_s must be in [0, 1] seconds, got {self.batch_wait_s}")
        if self.kv_cache_tokens < 0 or self.max_waiting < 0:
            raise ValueError(
                f"kv_cache_tokens and max_waiting must be >= 0, got {self.kv_cache_tokens}, {self.max_waiting}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
