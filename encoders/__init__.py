"""Encoders: media -> embeddings at the thinker's placeholder tokens (vision, audio, video), batched across requests.

The media loader (encoders/media.py) is imported on its own: `from omni.encoders.media import ...`.
"""

from omni.encoders.audio import AudioEncoder
from omni.encoders.video import encode_prompt, encode_prompts, load_encoders
from omni.encoders.vision import EncoderConfig, VisionEncoder, load_thinker, load_tower, plan_batches

__all__ = [
    "EncoderConfig",
    "VisionEncoder",
    "AudioEncoder",
    "encode_prompt",
    "encode_prompts",
    "load_encoders",
    "plan_batches",
    "load_tower",
    "load_thinker",
]
