"""A request's media through both encoders: `encode_prompt` (one request, the in-process pipeline) and
`encode_prompts` (several, batched: the caption job). A video's frames go through the vision tower and, with
use_audio_in_video, its own audio track (among the prompt's audios, at the video's place) through the audio tower.
`load_encoders` loads the two towers alone.
"""

from __future__ import annotations

from omni.types import MediaEmbeddings, PreparedPrompt
from omni.encoders.audio import AudioEncoder
from omni.encoders.vision import EncoderConfig, VisionEncoder, load_tower

__all__ = ["load_encoders", "encode_prompt", "encode_prompts"]


def load_encoders(model: str, config: EncoderConfig = EncoderConfig()) -> tuple[VisionEncoder, AudioEncoder]:
    """The vision and audio encoders of a checkpoint, loading the two towers (and nothing else of the thinker)."""
    return (
        VisionEncoder.for_tower(load_tower(model, "visual", config), config),
        AudioEncoder.for_tower(load_tower(model, "audio_tower", config), config),
    )


def encode_prompt(prompt: PreparedPrompt, vision: VisionEncoder, audio: AudioEncoder) -> MediaEmbeddings:
    """All media of one request, in prompt order. Images, videos and audios go in separate calls, as the official
    thinker encodes them, so the embeddings are the ones `thinker.generate` places (videos' tracks, with
    use_audio_in_video, are among `prompt.audios` already, at their videos' places). Qwen3's deepstack features come
    along (MediaEmbeddings.image_deepstack / video_deepstack)."""
    return encode_prompts([prompt], vision, audio)[0]


def encode_prompts(prompts: list[PreparedPrompt], vision: VisionEncoder, audio: AudioEncoder) -> list[MediaEmbeddings]:
    """The media of several requests, three batched calls in all (images, videos, audios across the requests); for
    one request the very calls of `encode_prompt`."""
    images = vision.encode_with_deepstack([it for p in prompts for it in p.images])
    videos = vision.encode_with_deepstack([it for p in prompts for it in p.videos])
    audios = audio.encode([it for p in prompts for it in p.audios])
    out, i, v, a = [], 0, 0, 0
    for p in prompts:
        ni, nv, na = len(p.images), len(p.videos), len(p.audios)
        out.append(MediaEmbeddings.assemble(images[i : i + ni], videos[v : v + nv], audios[a : a + na]))
        i, v, a = i + ni, v + nv, a + na
    return out
