"""omni.reference: the official transformers generate, on real media (espeak-ng speech, an ffmpeg video with its
audio track, a PIL image) decoded by qwen-omni-utils as the cookbooks do."""

import numpy as np
import pytest

from omni.reference import reference_generate
from omni.types import AudioPart, ChatRequest, ImagePart, InvalidRequest, Message, SamplingParams, TextPart, VideoPart


@pytest.fixture(scope="module")
def media(cookbook_media):
    """The oracle's media: the sample files decoded as the cookbooks decode them (qwen-omni-utils)."""
    return cookbook_media["image"], cookbook_media["audio"], cookbook_media["video"]


def _request(media, **kw):
    image, audio, video = media
    assert video.audio is not None
    return ChatRequest(
        [
            Message(
                "user", [ImagePart(image), AudioPart(audio), VideoPart(video), TextPart("What do you see and hear?")]
            )
        ],
        sampling=SamplingParams(max_tokens=10),
        talker_sampling=SamplingParams(max_tokens=40),
        use_audio_in_video=True,
        **kw,
    )


def test_text_and_speech_for_image_audio_and_video_with_its_track(tiny, media, stop_codes):
    from omni.tiny import TOKEN_IDS

    out = reference_generate(tiny, _request(media, speak=True))
    assert len(out.token_ids) == 10
    assert out.text == tiny.processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert 0 < len(out.codec_ids) <= 40
    n_audio_codes = len([c for c in out.codec_ids if c not in stop_codes])
    assert out.sample_rate == 24000 and out.waveform.dtype == np.float32
    assert out.waveform.shape == (480 * n_audio_codes,)
    assert float(np.sqrt((out.waveform**2).mean())) > 0.02  # audible
    prompt = np.array(out.prompt_ids)
    for placeholder in ("<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>"):
        assert (prompt == TOKEN_IDS[placeholder]).sum() > 0, placeholder


def test_text_only_mode_and_determinism(tiny, media):
    a = reference_generate(tiny, _request(media))
    b = reference_generate(tiny, _request(media))
    assert a.waveform is None and a.codec_ids == []
    assert a.token_ids == b.token_ids
    assert a.token_ids == reference_generate(tiny, _request(media, speak=True)).token_ids


def test_seeded_sampling_reproducible(tiny, media):
    req = _request(media)
    req.sampling = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=3)
    assert reference_generate(tiny, req).token_ids == reference_generate(tiny, req).token_ids


def test_unknown_voice(tiny, media):
    with pytest.raises(InvalidRequest, match="Chelsie, Ethan"):
        reference_generate(tiny, _request(media, speak=True, voice="Nobody"))
