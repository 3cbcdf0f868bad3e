"""The golden oracle's inputs, built as Qwen's cookbooks build them and not by this project's loaders or prompt code:
media decoded by qwen-omni-utils' `process_mm_info` (`cookbook_request`), the prompt rendered by the processor's
own chat template from the cookbook's conversation and the processor called on the decoded media
(`official_inputs`). omni/reference.py and omni/reference_qwen3.py take their inputs from here.

    req = cookbook_request([{"role": "user", "content": [{"type": "video", "video": "/data/clip.mp4"},
                                                          {"type": "text", "text": "What happens?"}]}],
                           use_audio_in_video=True, sampling=SamplingParams(max_tokens=16))
    out = reference_generate(load_model("tiny"), req)

Where the cookbook's call does not run as written on transformers 5.25, the change is the smallest that runs and
is commented where it is made (`official_inputs`). What our loaders (encoders/media.py) differ from `process_mm_info`
by, measured per format, is in tests/encoders/test_media_oracle.py: nothing for images, WAV at any rate, FLAC and
video frames; < 1e-6 for MP3 (libsndfile's mpg123 vs ffmpeg's decoder); < 1 step of 16 bits for a video's AAC track
(the cookbook reads it through the ffmpeg command line as 16-bit integers, we decode floats).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from omni.prompt import DEFAULT_SYSTEM_PROMPT
from omni.types import AudioPart, ChatRequest, ImagePart, InvalidRequest, Message, Part, TextPart, Video, VideoPart

__all__ = ["cookbook_request", "official_inputs"]


def _process_mm_info(conversation: list[dict], use_audio_in_video: bool):
    """qwen-omni-utils' process_mm_info -> (audios, images, videos, video kwargs), its video reader checked.

    Video reader: qwen-vl-utils reads a video file with torchcodec, else decord, else torchvision's `read_video`,
    which torchvision 0.29 no longer has. torchcodec 0.17 (the test extras; built for this torch) decodes with the
    system's FFmpeg libraries (`make setup` installs them) and is the reader qwen-vl-utils picks first. Handing it
    pre-decoded frames instead would skip the cookbook's own frame sampling (`smart_nframes`, the timestamps),
    which is part of what this oracle checks; so the file path goes in, and a missing torchcodec is an error rather
    than qwen-vl-utils' silent fallback to the reader that is gone."""
    from qwen_omni_utils import process_mm_info
    from qwen_omni_utils.v2_5 import vision_process

    has_video = any(
        isinstance(m["content"], list) and any(e.get("type") == "video" for e in m["content"]) for m in conversation
    )
    if has_video and vision_process.get_video_reader_backend() != "torchcodec":
        raise RuntimeError("the cookbook's video path needs torchcodec (pip install torchcodec, in the test extras)")
    return process_mm_info(conversation, use_audio_in_video=use_audio_in_video, return_video_kwargs=True)


def _uint8_frames(video: torch.Tensor) -> np.ndarray:
    """fetch_video's [T, 3, H, W] float32 (a uint8 resize cast to float, so whole numbers) -> [T, H, W, 3] uint8."""
    frames = video.permute(0, 2, 3, 1).numpy()
    out = frames.astype(np.uint8)
    assert np.array_equal(out, frames), "fetch_video returned frames that are not whole numbers in 0..255"
    return out


def cookbook_request(conversation: list[dict], use_audio_in_video: bool = False, **fields) -> ChatRequest:
    """A ChatRequest whose media are decoded by `process_mm_info` from a conversation in the cookbook's form
    (content items {"type": "image", "image": path}, {"type": "audio", "audio": path}, {"type": "video", "video":
    path}, {"type": "text", "text": ...}; a message's content may also be a string). Images come resized (PIL,
    smart_resize), audio as 16 kHz float32 (librosa.load), each video as its sampled, resized frames at the
    cookbook's sample fps, with its audio track when use_audio_in_video. fields: the other ChatRequest fields."""
    audios, images, videos, video_kwargs = _process_mm_info(conversation, use_audio_in_video)
    images, audios = iter(images or []), iter(audios or [])
    videos = iter(zip(videos or [], video_kwargs.get("fps", [])))
    messages = []
    for msg in conversation:
        if isinstance(msg["content"], str):
            messages.append(Message(msg["role"], msg["content"]))
            continue
        parts: list[Part] = []
        for ele in msg["content"]:  # process_mm_info returns each kind in content order (a video's track in its slot)
            if ele["type"] == "text":
                parts.append(TextPart(ele["text"]))
            elif ele["type"] == "image":
                parts.append(ImagePart(next(images)))
            elif ele["type"] == "audio":
                parts.append(AudioPart(next(audios)))
            elif ele["type"] == "video":
                frames, fps = next(videos)
                track = next(audios) if use_audio_in_video else None
                parts.append(VideoPart(Video(frames=_uint8_frames(frames), fps=float(fps), audio=track)))
            else:
                raise ValueError(f"unknown content type {ele['type']!r}")
        messages.append(Message(msg["role"], parts))
    return ChatRequest(messages, use_audio_in_video=use_audio_in_video, **fields)


def _conversation(request: ChatRequest):
    """The cookbook's conversation for `request` (its system message first, as the cookbooks write it) and the
    decoded media in the order process_mm_info returns them: (conversation, images, audios, videos, fps per video,
    audio slot sources: None for an audio item, i for the track of video i)."""
    conversation: list[dict[str, Any]] = []
    images: list[object] = []
    audios: list[np.ndarray] = []
    videos: list[torch.Tensor] = []
    fps: list[float] = []
    sources: list[Optional[int]] = []
    if not request.messages or request.messages[0].role != "system":
        conversation.append({"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]})
    for msg in request.messages:
        if isinstance(msg.content, str):
            conversation.append({"role": msg.role, "content": msg.content})
            continue
        content: list[dict[str, Any]] = []
        for part in msg.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image", "image": part.image})
                images.append(part.image)
            elif isinstance(part, AudioPart):
                content.append({"type": "audio", "audio": part.audio})
                audios.append(part.audio)
                sources.append(None)
            elif isinstance(part, VideoPart):
                content.append({"type": "video", "video": part.video.frames})
                if request.use_audio_in_video:
                    if part.video.audio is None:
                        raise InvalidRequest("use_audio_in_video is set but a video has no audio track")
                    audios.append(part.video.audio)
                    sources.append(len(videos))
                # the cookbook hands the processor fetch_video's float tensor [T, 3, H, W]
                videos.append(torch.from_numpy(part.video.frames).permute(0, 3, 1, 2).float())
                fps.append(part.video.fps)
            else:
                raise ValueError(f"unsupported content part {type(part).__name__}")
        conversation.append({"role": msg.role, "content": content})
    return conversation, images, audios, videos, fps, sources


def official_inputs(processor, request: ChatRequest):
    """The processor's BatchFeature for `request` as the cookbook computes it:

        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, audio=audios, images=images, videos=videos, return_tensors="pt",
                           padding=True, use_audio_in_video=USE_AUDIO_IN_VIDEO)

    with the official audio padding (300 s), and three changes, each needed on transformers 5.25:
    - use_audio_in_video is `load_audio_from_video` plus `audio_from_video_indices` (which audio slot is which
      video's track): given audio and video together, 5.25 refuses the cookbook's call without the indices;
    - the videos' sample fps goes in (`videos_kwargs.fps`, as the Qwen2.5-VL cookbook passes process_mm_info's
      video kwargs): without it the Omni processor assumes 2.0 (equal to fetch_video's sample fps unless its frame
      bounds moved it), and the TMRoPE time of each frame would not be the frame's;
    - `cap_pixels_per_frame=True`: qwen-vl-utils' per-frame pixel budget, which 5.25 warns it does not apply unless
      asked (frames resized by fetch_video already meet it, so the processor keeps their size either way)."""
    conversation, images, audios, videos, fps, sources = _conversation(request)
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    kwargs: dict[str, Any] = {}
    if videos:
        if len(set(fps)) > 1:
            raise InvalidRequest(f"the Omni processor takes one fps for all the videos of a request, got {fps}")
        kwargs["videos_kwargs"] = {"fps": fps[0], "cap_pixels_per_frame": True}
        if request.use_audio_in_video:
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=sources)
    return processor(
        text=text,
        images=images or None,
        videos=videos or None,
        audio=audios or None,
        return_tensors="pt",
        padding=True,
        **kwargs,
    )
