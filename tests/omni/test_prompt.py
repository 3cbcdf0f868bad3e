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
