"""Prompt building: chat template, placeholders expanded by the model's own processor, and the split of the
processor's batch into per-item encoder inputs.

The staged pipeline calls `processor_inputs`; the reference path builds its inputs apart, as Qwen's cookbooks do
(omni/reference_inputs.py), and tests/encoders/test_media_oracle.py checks that the two give the same ids and features.
"""

from __future__ import annotations

import torch

from omni.types import (
    AudioItem,
    AudioPart,
    ChatRequest,
    ImagePart,
    InvalidRequest,
    Message,
    PreparedPrompt,
    TextPart,
    VideoPart,
    VisionItem,
)

__all__ = ["with_default_system", "conversation", "processor_inputs", "prepare_prompt", "DEFAULT_SYSTEM_PROMPT"]

# Qwen's default system prompt (the official cookbooks'): every entry point adds it to a conversation that has none,
# and speech output needs it.
DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)


def with_default_system(messages: list[Message], system: str | None = None) -> list[Message]:
    """Qwen's default system prompt unless the conversation has one (speech output needs it); `system` replaces it."""
    rest = messages[1:] if messages and messages[0].role == "system" else messages
    if system is not None:
        return [Message("system", system)] + list(rest)
    if messages and messages[0].role == "system":
        return list(messages)
    return [Message("system", DEFAULT_SYSTEM_PROMPT)] + list(messages)


def _parts(content) -> list:
    return [TextPart(content)] if isinstance(content, str) else list(content)


def conversation(request: ChatRequest) -> tuple[list[dict], list, list, list, list]:
    """-> (chat-template messages, images, videos, audio slots, audio_from_video_indices), media in prompt order."""
    conv, images, videos, audios, audio_src = [], [], [], [], []
    for msg in with_default_system(request.messages):
        content = []
        for part in _parts(msg.content):
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image"})
                images.append(part.image)
            elif isinstance(part, AudioPart):
                content.append({"type": "audio"})
                audios.append(part.audio)
                audio_src.append(None)
            elif isinstance(part, VideoPart):
                content.append({"type": "video"})
                if request.use_audio_in_video:
                    if part.video.audio is None or len(part.video.audio) == 0:
                        raise InvalidRequest(
                            "use_audio_in_video is set but a video has no audio track",
                            "mm_processor_kwargs.use_audio_in_video",
                        )
                    audios.append(part.video.audio)
                    audio_src.append(len(videos))
                videos.append(part.video)
            else:
                raise InvalidRequest(f"unsupported content part {type(part).__name__}")
        conv.append({"role": msg.role, "content": content})
    return conv, images, videos, audios, audio_src


def short_audio_padding(processor, audios) -> dict:
    """Qwen's Whisper feature extractor pads every clip to 300 s (30000 frames) and masks the rest: ~0.2-1 s of CPU per
    clip. Padding to the longest clip + 1 s gives the same valid frames (the STFT of a frame sees at most n_fft / 2
    samples of padding; the log-mel floor comes from the clip's own maximum), 20-50x faster."""
    fe = processor.feature_extractor
    longest = max(len(a) for a in audios)
    need = (longest // fe.hop_length + 1) * fe.hop_length + fe.sampling_rate
    return {"audio_kwargs": {"max_length": min(need, fe.n_samples)}}


def processor_inputs(processor, request: ChatRequest, fast_audio: bool = False):
    """The processor's BatchFeature (batch of 1) for a request: input_ids, attention_mask, pixel_values(_videos),
    image/video_grid_thw, video_second_per_grid, input_features [n_audio, 128, frames], feature_attention_mask.
    fast_audio: pad audio features to the longest clip, not to 300 s (same valid features; the reference path keeps
    the official padding)."""
    conv, images, videos, audios, audio_src = conversation(request)
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    kwargs = short_audio_padding(processor, audios) if fast_audio and audios else {}
    if videos:
        fps = {v.fps for v in videos}
        if len(fps) > 1:
            raise InvalidRequest(f"all videos of a request must be sampled at one fps, got {sorted(fps)}")
        # fps -> video_second_per_grid = temporal_patch_size / fps; cap_pixels_per_frame: qwen-vl-utils' per-frame
        # pixel budget (our frames meet it already: their size is kept either way; asked for, 5.25 stops warning)
        kwargs["videos_kwargs"] = {"fps": fps.pop(), "cap_pixels_per_frame": True}
        if request.use_audio_in_video:
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=audio_src)
    # the frames as the cookbook hands them over (fetch_video's float [T, 3, H, W]): a processor that resizes them
    # again (Qwen3: 32-pixel patches) rounds a uint8 input back to uint8, a float one not (up to 0.1 apart)
    frames = [torch.from_numpy(v.frames).permute(0, 3, 1, 2).float() for v in videos]
    return processor(
        text=[text],
        images=images or None,
        videos=frames or None,
        audio=audios or None,
        return_tensors="pt",
        padding=True,
        **kwargs,
    )


def prepare_prompt(processor, request: ChatRequest) -> PreparedPrompt:
    """processor_inputs split into per-item encoder inputs, in prompt order.

    Each item's tensors are copies (`.clone()`), not views of the processor's batch: a pickled view carries its whole
    storage, so an item sent alone (to an encoder replica, through a Ray Data stage) would carry every item's
    pixels or features."""
    x = processor_inputs(processor, request, fast_audio=True)
    merge = int(getattr(processor.image_processor, "merge_size", 2))
    images, videos, audios = [], [], []
    for key, grid_key, out in (
        ("pixel_values", "image_grid_thw", images),
        ("pixel_values_videos", "video_grid_thw", videos),
    ):
        if key in x:
            sizes = x[grid_key].prod(-1).tolist()  # patches per item
            for pv, grid in zip(torch.split(x[key], sizes), x[grid_key]):
                out.append(VisionItem(pixel_values=pv.clone(), grid_thw=grid.clone(), merge_size=merge))
    if "input_features" in x:
        for feats, mask in zip(x["input_features"], x["feature_attention_mask"]):
            audios.append(AudioItem(features=feats[:, : int(mask.sum())].clone()))
    spg = x.get("video_second_per_grid")
    if spg is not None and not torch.is_tensor(spg):
        spg = torch.tensor(spg, dtype=torch.float)
    return PreparedPrompt(
        input_ids=x["input_ids"][0],
        images=images,
        videos=videos,
        audios=audios,
        video_second_per_grid=spg,
        use_audio_in_video=request.use_audio_in_video,
    )
