"""Encoders: media -> embeddings at the thinker's placeholder tokens (vision, audio, video), batched across requests.

The media loader (encoders/media.py) is imported on its own: `from omni.encoders.media import ...`.
"""
from omni.encoders.audio import AudioEncoder
from omni.encoders.video import VideoEncoder, encode_prompt
from omni.encoders.vision import EncoderConfig, VisionEncoder, load_thinker, load_tower, plan_batches
from omni.encoders import qwen3  # noqa: F401  Qwen3-Omni's encoders, which `for_tower` finds as subclasses

__all__ = ["EncoderConfig", "VisionEncoder", "AudioEncoder", "VideoEncoder", "encode_prompt", "plan_batches",
           "load_tower", "load_thinker"]
