"""Qwen3-Omni's encoder towers behind the same interfaces as Qwen2.5's (encoders/vision.py, encoders/audio.py).

Vision: `thinker.model.visual` (Qwen3OmniMoeVisionEncoder) returns, besides the merged embeddings, one "deepstack"
feature map per tapped tower layer (`vision_config.deepstack_visual_indexes`, 3 in the real model), each through its
own patch merger: [sum n_tokens, H] per level. The Thinker adds level i to the output of its decoder layer i at the
same placeholder tokens. Attention is per item (cu_seqlens over grid_thw), so items batch freely.

Audio: `thinker.model.audio_tower` (Qwen3OmniMoeAudioEncoder) takes the valid frames of several audios concatenated
([128, sum n_frames]) with their lengths, cuts each into windows of 2 * n_window frames and attends within
n_window_infer frames of its own audio only. Tokens per audio, from n feature frames (100/s), the model's own formula
(`_get_feat_extract_output_lengths`): 13 per full 100-frame window, three stride-2 convolutions over the remainder.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

from omni.types import VisionItem
from omni.encoders.audio import AudioEncoder
from omni.encoders.vision import VisionEncoder, detach_chunks, plan_batches

__all__ = ["Qwen3VisionEncoder", "Qwen3AudioEncoder"]


class Qwen3VisionEncoder(VisionEncoder):
    """Images and video frames -> embeddings and deepstack features, several items per forward."""

    def __init__(self, visual: torch.nn.Module, config):
        super().__init__(visual, config)
        self.deepstack_levels = len(visual.config.deepstack_visual_indexes)

    def encode(self, items: list[VisionItem]) -> list[torch.Tensor]:
        return [e for e, _ in self.encode_with_deepstack(items)]

    @torch.no_grad()
    def encode_with_deepstack(self, items: list[VisionItem]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> per item (embeds [n_tokens, H], deepstack [n_levels, n_tokens, H]) float32 on the CPU, in order."""
        patches = [self._check(i, item) for i, item in enumerate(items)]
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in plan_batches(patches, self.config.max_batch_items, self.config.max_batch_tokens):
            batch = [items[i] for i in group]
            # pixel_values: [sum n_patches, 1536]; grid_thw: [n_items, 3]
            pixel_values = torch.cat([b.pixel_values for b in batch]).to(self.config.device, self.config.torch_dtype)
            grid_thw = torch.stack([b.grid_thw for b in batch]).to(self.config.device)
            res = self.visual(pixel_values, grid_thw=grid_thw)
            sizes = [patches[i] // self.merge_unit for i in group]
            embeds = detach_chunks(res.pooler_output, sizes)  # per item [n_tokens, H]
            levels = torch.stack(list(res.deepstack_features))  # [n_levels, sum n_tokens, H]
            deep = [
                d.permute(1, 0, 2).contiguous()
                for d in detach_chunks(levels.permute(1, 0, 2), sizes)  # per item [n_levels, n_tokens, H]
            ]
            out += list(zip(embeds, deep))
        return out


class Qwen3AudioEncoder(AudioEncoder):
    """Audio features -> embeddings at the thinker's audio placeholder tokens, several items per forward."""

    def lengths(self, n_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n] feature frames -> ([n] frames, [n] output tokens): the tower has no separate after-conv length."""
        return n_frames, _get_feat_extract_output_lengths(n_frames, self.audio_tower.config.n_window)

    def _forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        return self.audio_tower(features, feature_lens=feature_lens).last_hidden_state
