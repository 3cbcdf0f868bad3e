"""Prompt building: the short audio padding gives the official processor's valid features, bit for bit."""

import numpy as np
import pytest
import torch

from omni.prompt import prepare_prompt, processor_inputs
from omni.types import AudioPart, ChatRequest, Message, TextPart


@pytest.mark.parametrize("seconds", [0.2, 3.46, 7.0, 31.5])
def test_short_audio_padding_keeps_the_official_features(tiny, speech, seconds):
    n = int(seconds * 16000)
    audio = np.tile(speech, int(np.ceil(n / len(speech))))[:n]
    other = speech[: len(speech) // 3]
    req = ChatRequest([Message("user", [AudioPart(audio), AudioPart(other), TextPart("What is said?")])])
    official = processor_inputs(tiny.processor, req)  # padded to 300 s, as Qwen's processor does
    assert official["input_features"].shape[-1] == 30000
    fast = prepare_prompt(tiny.processor, req)
    assert torch.equal(fast.input_ids, official["input_ids"][0])
    for item, feats, mask in zip(fast.audios, official["input_features"], official["feature_attention_mask"]):
        valid = int(mask.sum())
        assert item.features.shape == (128, valid)
        assert torch.equal(item.features, feats[:, :valid])


def test_each_item_carries_only_its_own_tensors(tiny, media):
    """A per-item tensor sliced out of the processor's batch is a view, and a pickled view carries its whole storage:
    each image would ship every image's pixels to its encoder call. Each item's tensors pickle to their own size."""
    import pickle

    from omni.types import ImagePart

    clip = media["audio"][:16000]  # 1 s
    req = ChatRequest(
        [
            Message(
                "user",
                [
                    ImagePart(media["image"]),
                    ImagePart(media["image"]),
                    AudioPart(clip),
                    TextPart("What do you see and hear?"),
                ],
            )
        ]
    )
    p = prepare_prompt(tiny.processor, req)
    assert len(p.images) == 2 and len(p.audios) == 1
    margin = 1024  # pickle's own framing (the tensor's metadata, the storage header)
    tensors = {
        f"image {i} {name}": getattr(item, name)
        for i, item in enumerate(p.images)
        for name in ("pixel_values", "grid_thw")
    }
    tensors["audio 0 features"] = p.audios[0].features
    for what, t in tensors.items():
        assert len(pickle.dumps(t)) <= t.nbytes + margin, f"{what}: pickles its whole batch's storage"
    one = len(pickle.dumps(p.images[0]))
    assert one <= p.images[0].pixel_values.nbytes + 2 * margin
    assert len(pickle.dumps(p.images)) <= 2 * one + margin  # N images ~ N x one, not N^2


def test_the_generating_stages_get_the_layout_not_the_media(tiny, media):
    """What crosses into the Thinker's replica: the ids and the media's shapes (grids, lengths), never pixels or
    features; the same whatever the media's size."""
    import pickle

    from omni.types import ImagePart, VideoPart

    req = ChatRequest(
        [
            Message(
                "user",
                [
                    ImagePart(media["image"]),
                    VideoPart(media["video"]),
                    AudioPart(media["audio"]),
                    TextPart("What do you see and hear?"),
                ],
            )
        ]
    )
    p = prepare_prompt(tiny.processor, req)
    layout = p.layout
    assert torch.equal(layout.input_ids, p.input_ids)
    assert torch.equal(layout.image_grid_thw, p.image_grid_thw) and torch.equal(layout.video_grid_thw, p.video_grid_thw)
    assert torch.equal(layout.audio_seqlens, p.audio_seqlens) and layout.use_audio_in_video == p.use_audio_in_video
    media_bytes = sum(i.pixel_values.nbytes for i in p.images + p.videos) + sum(a.features.nbytes for a in p.audios)
    assert len(pickle.dumps(layout)) <= p.input_ids.nbytes + 4096 < media_bytes / 10
