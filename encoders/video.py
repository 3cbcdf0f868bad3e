"""Video encoder stage: a video's frames through the vision tower and, with use_audio_in_video, its own audio track
through the audio tower; one call encodes several videos (two forwards in all, not two per video).

Also `encode_prompt`, the whole media of one request, for the in-process pipeline.
"""
from __future__ import annotations

from typing import Optional

import torch

from omni.encoders.audio import AudioEncoder
from omni.encoders.vision import EncoderConfig, VisionEncoder, load_tower
from omni.types import AudioItem, MediaEmbeddings, PreparedPrompt, VisionItem

__all__ = ["VideoEncoder", "encode_prompt"]


class VideoEncoder:
    """Frames (VisionItem, temporal grid > 1) plus an optional audio track per video -> (frames, track) embeddings."""

    def __init__(self, vision: VisionEncoder, audio: AudioEncoder):
        self.vision, self.audio = vision, audio
        self.out_hidden_size: int = vision.out_hidden_size

    @classmethod
    def from_pretrained(cls, model: str, config: EncoderConfig = EncoderConfig()) -> "VideoEncoder":
        """Loads the two towers (and nothing else of the thinker)."""
        return cls(VisionEncoder.for_tower(load_tower(model, "visual", config), config),
                   AudioEncoder.for_tower(load_tower(model, "audio_tower", config), config))

    def encode(self, videos: list[VisionItem],
               audios: list[Optional[AudioItem]]) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """-> per video ([n_video_tokens_i, H], [n_audio_tokens_i, H] or None), in input order."""
        if len(audios) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(audios)} audio tracks (use None for a video without)")
        frames = self.vision.encode(videos)
        tracks = iter(self.audio.encode([a for a in audios if a is not None]))
        return [(f, None if a is None else next(tracks)) for f, a in zip(frames, audios)]


def encode_prompt(prompt: PreparedPrompt, vision: VisionEncoder, audio: AudioEncoder) -> MediaEmbeddings:
    """All media of one request, in prompt order. Images, videos and audios go in separate calls, as the official
    thinker encodes them, so the embeddings are the ones `thinker.generate` places (videos' tracks, with
    use_audio_in_video, are among `prompt.audios` already, at their videos' places). Qwen3's deepstack features come
    along (MediaEmbeddings.image_deepstack / video_deepstack)."""
    images, videos = vision.encode_with_deepstack(prompt.images), vision.encode_with_deepstack(prompt.videos)
    return MediaEmbeddings(images=[e for e, _ in images], videos=[e for e, _ in videos],
                           audios=audio.encode(prompt.audios),
                           image_deepstack=[d for _, d in images if d is not None],
                           video_deepstack=[d for _, d in videos if d is not None])
