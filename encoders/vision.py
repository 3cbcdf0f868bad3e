"""Vision encoder stage: the thinker's vision tower (`thinker.model.visual`) over a batch of images or video frames
from different requests, one forward per batch. Qwen2.5-Omni's here; Qwen3-Omni's (with its deepstack features) in
encoders/qwen3.py, a subclass that `VisionEncoder.for_tower` / `from_pretrained` pick through the architecture's
record (omni.architectures).

The tower takes packed inputs: several items' patches concatenated, their grids stacked. Attention is restricted to
each item (cu_seqlens over `grid_thw`), so an item's embeddings do not depend on what it is batched with, up to the
matmul kernels' batch-size dependence (see tests/encoders/test_encoders.py for the measured difference).

Also home of what the three encoders share: `EncoderConfig`, `plan_batches`, `load_tower` (one tower's weights only)
and `load_thinker`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni.architectures import architecture_of_tower
from omni.checkpoint import model_architecture, resolve_model
from omni.types import VisionItem

__all__ = ["EncoderConfig", "VisionEncoder", "plan_batches", "load_tower", "load_thinker"]


@dataclass(frozen=True)
class EncoderConfig:
    device: str = "cpu"  # where the tower runs: "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # the tower's weights and activations; "bfloat16" on GPU (the real weights' dtype)
    max_batch_items: int = 16  # items per forward at most (longer lists are split into several forwards)
    max_batch_tokens: int = 65536  # patches (vision) / feature frames (audio) per forward at most

    def __post_init__(self):
        if self.max_batch_items < 1 or self.max_batch_tokens < 1:
            raise ValueError(
                f"max_batch_items and max_batch_tokens must be >= 1, got {self.max_batch_items}, "
                f"{self.max_batch_tokens}"
            )
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def plan_batches(sizes: list[int], max_items: int, max_tokens: int) -> list[range]:
    """Split items (their sizes in patches or frames) into consecutive groups of at most `max_items` items and
    `max_tokens` total size, in input order. An item larger than `max_tokens` on its own forms its own group: an item
    is never cut, its attention spans all of it."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size > max_tokens):
            groups.append(range(start, i))
            start, total = i, 0
        total += size
    if sizes:
        groups.append(range(start, len(sizes)))
    return groups


def load_tower(model: str, name: str, config: EncoderConfig) -> torch.nn.Module:
    """One tower of the checkpoint's thinker, `name` "visual" or "audio_tower", and nothing else of it (no language
    model, no other tower), in `config.dtype`, on the CPU; the encoder moves it to `config.device` (omni.parts)."""
    from omni.parts import load_tower as load

    return load(model, name, config.torch_dtype)


def load_thinker(model: str, config: EncoderConfig):
    """The whole thinker (language model and both towers; no talker, no token2wav / code2wav), of the checkpoint's
    architecture, in `config.dtype`, on the CPU. The encoders load their tower alone (`load_tower`); this is for
    comparing against the thinker's own encoder paths."""
    path = resolve_model(model)
    cls = model_architecture(path).load("hf_thinker")
    return cls.from_pretrained(path, dtype=config.torch_dtype).eval()


def place(module: torch.nn.Module, config: EncoderConfig) -> torch.nn.Module:
    """Move a tower to `config.device` and cast its parameters (not its buffers) to `config.dtype`, in place.
    Buffers keep their dtype, as from_pretrained(dtype=...) leaves them: the rotary `inv_freq` stays float32, and
    casting it to bfloat16 would change the embeddings."""
    module.to(device=config.device)
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != config.torch_dtype:
            param.data = param.data.to(config.torch_dtype)
    return module.eval()


def detach_chunks(out: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """[sum(sizes), H] on the device -> per-item [size_i, H] float32 CPU tensors, each its own copy (a split is a
    view, and pickling a view ships the whole batch's storage across a process boundary)."""
    return [c.to(device="cpu", dtype=torch.float32, copy=True) for c in torch.split(out, sizes)]


class VisionEncoder:
    """Images and video frames -> embeddings at the thinker's placeholder tokens, several items per forward."""

    def __init__(self, visual: torch.nn.Module, config: EncoderConfig = EncoderConfig()):
        self.config = config
        self.visual = place(visual, config)  # in place: the module is moved / cast, not copied
        vc = visual.config
        self.merge_unit = vc.spatial_merge_size**2  # patches per output token (2 x 2)
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2  # 3 * 2 * 14 * 14 = 1176
        self.out_hidden_size: int = vc.out_hidden_size  # H, the thinker's hidden size

    @staticmethod
    def for_tower(visual: torch.nn.Module, config: EncoderConfig = EncoderConfig()) -> VisionEncoder:
        """The encoder class that the tower's architecture record names (omni.architectures: Qwen3-Omni's is
        encoders/qwen3.py's), over this tower."""
        return architecture_of_tower(visual).load("vision_encoder")(visual, config)

    @classmethod
    def from_pretrained(cls, model: str, config: EncoderConfig = EncoderConfig()) -> VisionEncoder:
        """A preset, a checkpoint directory or a hub id; loads `thinker.model.visual` only."""
        return cls.for_tower(load_tower(model, "visual", config), config)

    def num_tokens(self, item: VisionItem) -> int:
        return int(item.grid_thw.prod()) // self.merge_unit

    def _check(self, i: int, item: VisionItem) -> int:
        n = int(item.grid_thw.prod())
        if item.grid_thw.shape != (3,) or tuple(item.pixel_values.shape) != (n, self.patch_dim):
            raise ValueError(
                f"vision item {i}: pixel_values {tuple(item.pixel_values.shape)} does not match "
                f"grid_thw {item.grid_thw.tolist()} (expected [{n}, {self.patch_dim}])"
            )
        if n % self.merge_unit:
            raise ValueError(f"vision item {i}: {n} patches is not a multiple of {self.merge_unit}")
        return n

    @torch.no_grad()
    def encode(self, items: list[VisionItem]) -> list[torch.Tensor]:
        """-> per item [grid_thw.prod() // 4, H] float32 on the CPU, in input order."""
        patches = [self._check(i, item) for i, item in enumerate(items)]
        out: list[torch.Tensor] = []
        for group in plan_batches(patches, self.config.max_batch_items, self.config.max_batch_tokens):
            batch = [items[i] for i in group]
            # pixel_values: [sum n_patches, 1176]; grid_thw: [n_items, 3]
            pixel_values = torch.cat([b.pixel_values for b in batch]).to(self.config.device, self.config.torch_dtype)
            grid_thw = torch.stack([b.grid_thw for b in batch]).to(self.config.device)
            embeds = self.visual(pixel_values, grid_thw=grid_thw).pooler_output  # [sum n_tokens, H]
            out += detach_chunks(embeds, [patches[i] // self.merge_unit for i in group])
        return out

    def encode_with_deepstack(self, items: list[VisionItem]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """-> per item (embeds [n_tokens, H], deepstack [n_levels, n_tokens, H] or None: Qwen2.5 has none)."""
        return [(e, None) for e in self.encode(items)]
