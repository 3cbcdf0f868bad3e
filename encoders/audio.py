"""Audio encoder stage: the thinker's audio tower (`thinker.model.audio_tower`) over a batch of audios (plain audio
parts and videos' own tracks) from different requests, one forward per batch. Qwen2.5-Omni's here; Qwen3-Omni's in
encoders/qwen3.py (a subclass picked by `AudioEncoder.for_tower` / `from_pretrained` through the
architecture's record).

The tower takes the valid feature frames of several audios concatenated ([128, sum n_frames]) with their lengths, as
`Qwen2_5OmniThinkerModel.get_audio_features` calls it. It cuts each audio into windows of 2 * n_window frames (1 s)
and attends within a window only, so an audio's embeddings do not depend on its batch-mates.

Tokens per audio, from n feature frames (100/s): conv2 (stride 2) -> (n - 1) // 2 + 1, then average pooling
(stride 2) -> (that - 2) // 2 + 1: 25 tokens per second.
"""

from __future__ import annotations

import torch

from omni.architectures import architecture_of_tower
from omni.types import AudioItem
from omni.encoders.vision import EncoderConfig, detach_chunks, load_tower, place, plan_batches

__all__ = ["AudioEncoder"]


class AudioEncoder:
    """Audio features -> embeddings at the thinker's audio placeholder tokens, several items per forward."""

    def __init__(self, audio_tower: torch.nn.Module, config: EncoderConfig = EncoderConfig()):
        self.config = config
        self.audio_tower = place(audio_tower, config)  # in place: the module is moved / cast, not copied
        self.num_mel_bins: int = audio_tower.config.num_mel_bins  # 128
        self.out_hidden_size: int = audio_tower.config.output_dim  # H, the thinker's hidden size

    @staticmethod
    def for_tower(audio_tower: torch.nn.Module, config: EncoderConfig = EncoderConfig()) -> AudioEncoder:
        """The encoder class that the tower's architecture record names (omni.architectures: Qwen3-Omni's is
        encoders/qwen3.py's), over this tower."""
        return architecture_of_tower(audio_tower).load("audio_encoder")(audio_tower, config)

    @classmethod
    def from_pretrained(cls, model: str, config: EncoderConfig = EncoderConfig()) -> AudioEncoder:
        """A preset, a checkpoint directory or a hub id; loads `thinker.model.audio_tower` only."""
        return cls.for_tower(load_tower(model, "audio_tower", config), config)

    def _forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """features [128, sum n_frames], feature_lens [n_items] -> [sum n_tokens, H]."""
        aftercnn_lens, _ = self.lengths(feature_lens)
        return self.audio_tower(features, feature_lens=feature_lens, aftercnn_lens=aftercnn_lens).last_hidden_state

    def lengths(self, n_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n] feature frames -> ([n] frames after the convolutions, [n] output tokens), the tower's own formula."""
        return self.audio_tower._get_feat_extract_output_lengths(n_frames)

    def num_tokens(self, item: AudioItem) -> int:
        return int(self.lengths(torch.tensor([item.features.shape[-1]]))[1][0])

    def _check(self, i: int, item: AudioItem) -> int:
        f = item.features
        if f.dim() != 2 or f.shape[0] != self.num_mel_bins or f.shape[1] < 1:
            raise ValueError(
                f"audio item {i}: features must be [{self.num_mel_bins}, n_frames >= 1], got {tuple(f.shape)}"
            )
        return int(f.shape[1])

    def encode_with_deepstack(self, items: list[AudioItem]) -> list[tuple[torch.Tensor, None]]:
        """The vision encoders' interface (omni.serve.cluster's encoder deployments call either the same way): per
        item (embeds, None), audio has no deepstack features."""
        return [(e, None) for e in self.encode(items)]

    @torch.no_grad()
    def encode(self, items: list[AudioItem]) -> list[torch.Tensor]:
        """-> per item [n_audio_tokens_i, H] float32 on the CPU, in input order."""
        frames = [self._check(i, item) for i, item in enumerate(items)]
        out: list[torch.Tensor] = []
        for group in plan_batches(frames, self.config.max_batch_items, self.config.max_batch_tokens):
            # features: [128, sum n_frames]; feature_lens: [n_items]
            features = torch.cat([items[i].features for i in group], dim=1).to(self.config.device)
            feature_lens = torch.tensor([frames[i] for i in group], dtype=torch.long, device=self.config.device)
            n_tokens = self.lengths(feature_lens)[1]
            embeds = self._forward(features, feature_lens)  # [sum n_tokens, H]
            if embeds.shape[0] != int(n_tokens.sum()):
                raise RuntimeError(f"audio tower returned {embeds.shape[0]} tokens, expected {int(n_tokens.sum())}")
            out += detach_chunks(embeds, n_tokens.tolist())
        return out
