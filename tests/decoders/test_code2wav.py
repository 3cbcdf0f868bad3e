"""Qwen3-Omni's Code2Wav (decoders/code2wav.py) on the tiny checkpoint: offline decoding is the official generate's
waveform, streaming from the first frames with left context only equals offline decoding (exactly in float64, within
MAX_STREAM_ERROR in float32) for every schedule, the receptive field computed from the config is the measured one,
and streams batch."""

import copy

import numpy as np
import pytest
import torch

from omni.decoders.code2wav import MAX_STREAM_ERROR, Code2Wav, Code2WavConfig, receptive_field

N = 60  # frames (4.8 s), > the tiny model's receptive field (14 + 11 frames): windows start inside the utterance
SCHEDULES = [(1, 1), (1, 4), (2, 8), (3, 5), (4, 16)]  # (first_chunk_frames, chunk_frames)


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2048, (N, 16), generator=g).tolist()


@pytest.fixture(scope="module")
def c2w(tiny_qwen3):
    return tiny_qwen3.model.code2wav


def stream(vocoder: Code2Wav, frames, push: int = 3) -> tuple[np.ndarray, list[int]]:
    """Frames pushed `push` at a time, as a talker hands them over; -> (waveform, samples out after each push)."""
    s, pcm, out = vocoder.open_stream(), [], []
    for i in range(0, len(frames), push):
        s.push(frames[i : i + push], last=i + push >= len(frames))
        pcm += vocoder.step([s])[0]
        out.append(sum(len(p) for p in pcm))
    assert s.finished and not s.ready
    return np.concatenate(pcm), out


def test_offline_is_the_official_waveform(tiny_qwen3, media_dir):
    from omni.reference import reference_generate
    from omni.types import ChatRequest, ImagePart, Message, SamplingParams, TextPart
    from omni.encoders.media import MediaPolicy, load_image

    image = load_image(str(media_dir / "image.png"), MediaPolicy(allowed_local_media_path=str(media_dir)))
    req = ChatRequest(
        [Message("user", [ImagePart(image), TextPart("What is it?")])],
        sampling=SamplingParams(max_tokens=6),
        talker_sampling=SamplingParams(max_tokens=24),
        speak=True,
    )
    ref = reference_generate(tiny_qwen3, req)
    vocoder = Code2Wav.from_pretrained(tiny_qwen3.path)  # only the code2wav weights
    offline = vocoder.offline(ref.codec_ids)
    assert offline.shape == ref.waveform.shape == (23 * 1920 - 555,)
    assert np.abs(offline - ref.waveform).max() <= 1e-4
    streamed, _ = stream(vocoder, ref.codec_ids)
    assert np.abs(streamed - offline).max() <= MAX_STREAM_ERROR


@pytest.mark.parametrize("first,chunk", SCHEDULES)
def test_streamed_equals_offline_from_the_first_frames(c2w, frames, first, chunk):
    vocoder = Code2Wav(c2w, Code2WavConfig(first_chunk_frames=first, chunk_frames=chunk))
    offline = vocoder.offline(frames)
    streamed, out = stream(vocoder, frames, push=1)
    assert streamed.shape == offline.shape == (N * 1920 - 555,)
    assert np.abs(streamed - offline).max() <= MAX_STREAM_ERROR
    assert out[first - 1] == first * 1920 - 555 and out[first - 2 : first - 1] in ([], [0])  # audio after `first`


def test_streaming_is_exact_in_float64_and_context_matters(c2w, frames):
    """The float32 difference is rounding: in float64 streamed == offline to 1e-10. Cutting the transformer's
    context (vllm-omni's 25-frame left context is the same kind of cut for the real model) is not exact."""
    double = Code2Wav(copy.deepcopy(c2w).double(), Code2WavConfig(first_chunk_frames=1, chunk_frames=3))
    offline = double.offline(frames)
    assert np.abs(stream(double, frames)[0] - offline).max() <= 1e-10
    cut = Code2Wav(c2w, Code2WavConfig(transformer_context_frames=7))
    assert np.abs(stream(cut, frames)[0] - cut.offline(frames)).max() > 1e-2


def test_receptive_field_from_the_config_is_the_measured_one(c2w, frames):
    t_ctx, conv_ctx, holdback = receptive_field(c2w.config)
    assert (t_ctx, holdback) == (2 * 7, 555)  # 2 layers x (window 8 - 1); the deconvolutions' dropped samples
    codes = torch.tensor(frames).T[None]
    with torch.no_grad():
        base = c2w(codes)[0, 0]
        for j in (20, 40):
            moved = codes.clone()
            moved[..., j] = (moved[..., j] + 7) % 2048
            changed = torch.nonzero((c2w(moved)[0, 0] - base).abs() > 1e-6).flatten()
            assert int(changed.min()) == j * 1920 - holdback  # causal: nothing before frame j's first sample
            assert int(changed.max()) < (j + t_ctx + conv_ctx) * 1920  # nothing past the stated left context


def test_streams_batch_into_one_call(c2w, frames):
    vocoder = Code2Wav(c2w, Code2WavConfig(first_chunk_frames=2, chunk_frames=4))
    solo = [stream(vocoder, f)[0] for f in (frames, frames[::-1], frames[:30])]
    calls = vocoder.stats.calls
    streams = [vocoder.open_stream() for _ in range(3)]
    pcm = [[], [], []]
    for i in range(0, N, 3):
        for s, f in zip(streams, (frames, frames[::-1], frames[:30])):
            if not s._last:
                s.push(f[i : i + 3], last=i + 3 >= len(f))
        for p, new in zip(pcm, vocoder.step(streams)):
            p += new
    together = [np.concatenate(p) for p in pcm]
    # batch-size-dependent kernels round differently: the same float32 bound as streaming
    assert all(np.abs(a - b).max() <= MAX_STREAM_ERROR for a, b in zip(solo, together))
    assert vocoder.stats.calls - calls <= N // 3 + 2  # one call per step for all three streams (equal windows)


def test_bad_frames_are_refused(c2w):
    vocoder = Code2Wav(c2w)
    with pytest.raises(ValueError, match="16 ids"):
        vocoder.open_stream().push([[1, 2, 3]])
    with pytest.raises(ValueError, match="16 ids"):
        vocoder.offline([[2048] * 16])
