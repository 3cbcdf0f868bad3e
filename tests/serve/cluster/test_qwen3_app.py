"""The Ray Serve app on the tiny Qwen3-Omni (`omni serve --model tiny-qwen3`: the same app, deployments and HTTP layer
as for Qwen2.5, the stages picked from the checkpoint's config), one app for the module, shut down after: through
its deployment handles the text ids and all 16 codebooks of every frame equal the official generate for every input
mix, the streamed waveform within MAX_STREAM_ERROR (+ the official's 1e-4) of the official one; through the official
`openai` SDK, text and streamed speech as the reference gives them, voices validated per model, /v1/models."""

import asyncio
import base64
import dataclasses

import httpx
import numpy as np
import pytest

from omni.decoders import MAX_STREAM_ERROR

pytestmark = pytest.mark.slow
KINDS = ["text", "image", "audio", "video", "video+audio", "all"]
FRAMES = 12  # Talker steps per reply (11 frames)


@pytest.fixture(scope="module")
def server(omni_serve, tiny_qwen3):
    """`omni serve --model tiny-qwen3` for the module (its own Ray, this process joined to it)."""
    return omni_serve("--model", "tiny-qwen3", "--config", "tiny", "--api-key", "sk-test").url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="sk-test", timeout=120, max_retries=0)


def uri(media_dir, name, mime):
    return f"data:{mime};base64," + base64.b64encode((media_dir / name).read_bytes()).decode()


@pytest.fixture(scope="module")
def ray_stages(server, tiny_qwen3):
    """The composition over the app's deployment handles, as its ingress runs it."""
    from ray import serve

    from omni.serve.cluster.builder import stage_deployments
    from omni.serve.cluster.deployments import HandleStages
    from omni.serve.compose import Composition
    from omni.serve.config import load_serve_config

    cfg = load_serve_config("tiny")  # its stages co-located: one ThinkerTalkerVocoder deployment (colocate)
    handle = lambda name: serve.get_deployment_handle(name, app_name="omni")  # noqa: E731
    named = stage_deployments(cfg)
    return Composition(
        HandleStages(
            "tiny-qwen3",
            cfg,
            handle("VisionEncoder"),
            handle("AudioEncoder"),
            handle(named["thinker"]),
            handle(named["vocoder"]),
            tiny_qwen3.voices,
        )
    )


def test_every_mix_through_ray_equals_the_official_generate(ray_stages, tiny_qwen3, media):
    from omni.reference import reference_generate
    from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart, VideoPart

    parts = {
        "text": [],
        "image": [ImagePart(media["image"])],
        "audio": [AudioPart(media["audio"])],
        "video": [VideoPart(media["video"])],
        "video+audio": [VideoPart(media["video"])],
        "all": [ImagePart(media["image"]), AudioPart(media["audio"]), VideoPart(media["video"])],
    }
    for kind in KINDS:
        req = ChatRequest(
            [Message("user", parts[kind] + [TextPart(f"Describe the {kind}.")])],
            sampling=SamplingParams(max_tokens=8),
            talker_sampling=SamplingParams(max_tokens=FRAMES),
            speak=True,
            voice="Aiden",
            use_audio_in_video=kind in ("video+audio", "all"),
        )
        ref = reference_generate(tiny_qwen3, req)
        out = asyncio.run(ray_stages.run(dataclasses.replace(req)))
        assert out.token_ids == ref.token_ids and out.text == ref.text, kind
        assert out.codec_ids == ref.codec_ids and len(out.codec_ids) == FRAMES - 1, kind
        assert out.waveform.shape == ref.waveform.shape, kind
        assert np.abs(out.waveform - ref.waveform).max() <= MAX_STREAM_ERROR + 1e-4, kind


def test_http_text_and_streamed_speech_equal_the_reference(client, tiny_qwen3, cookbook_media, media_dir):
    from omni.reference import reference_generate
    from omni.types import TALKER_DEFAULT_SAMPLING, ChatRequest, ImagePart, Message, SamplingParams, TextPart

    stream = client.chat.completions.create(
        model="tiny-qwen3",
        stream=True,
        max_tokens=8,
        temperature=0,
        modalities=["text", "audio"],
        audio={"voice": "ethan", "format": "pcm16"},  # voices match case-insensitively, as for Qwen2.5
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri(media_dir, "image.png", "image/png")}},
                    {"type": "text", "text": "Describe it aloud."},
                ],
            }
        ],
        extra_body={"sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 24}]},
    )
    text, pcm = [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        audio = delta.model_dump().get("audio") or {}
        if audio.get("data"):
            pcm.append(np.frombuffer(base64.b64decode(audio["data"]), dtype="<i2"))
    # what the HTTP request asks for: the Talker's defaults, greedy (the repetition penalty stays), 24 steps
    req = ChatRequest(
        [Message("user", [ImagePart(cookbook_media["image"]), TextPart("Describe it aloud.")])],
        sampling=SamplingParams(max_tokens=8),
        speak=True,
        voice="Ethan",
        talker_sampling=dataclasses.replace(TALKER_DEFAULT_SAMPLING, temperature=0.0, max_tokens=24),
    )
    ref = reference_generate(tiny_qwen3, req)
    assert "".join(text) == ref.text
    assert len(pcm[0]) == 2 * 1920 - 555  # the first packet: 2 frames (configs/serve/tiny.yaml), less 555 held back
    wav = np.concatenate(pcm).astype(np.float32) / 32768
    assert wav.shape == ref.waveform.shape == (23 * 1920 - 555,)
    assert np.abs(wav - ref.waveform).max() <= MAX_STREAM_ERROR + 1e-4 + 1 / 32768  # PCM16 rounding on top


def test_text_only_reply_with_audio_in_video(client, tiny_qwen3, cookbook_media, media_dir):
    from omni.reference import reference_generate
    from omni.types import ChatRequest, Message, SamplingParams, TextPart, VideoPart

    video = cookbook_media["video"]  # the oracle's media: the cookbook's decoding of clip.mp4
    r = client.chat.completions.create(
        model="tiny-qwen3",
        max_tokens=10,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": uri(media_dir, "clip.mp4", "video/mp4")}},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
        extra_body={"mm_processor_kwargs": {"use_audio_in_video": True}},
    )
    ref = reference_generate(
        tiny_qwen3,
        ChatRequest(
            [Message("user", [VideoPart(video), TextPart("What happens?")])],
            sampling=SamplingParams(max_tokens=10),
            use_audio_in_video=True,
        ),
    )
    assert r.choices[0].message.content == ref.text and r.choices[0].message.audio is None
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == len(ref.prompt_ids)


def test_voices_are_this_models_and_models_lists_it(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3"]
    r = httpx.post(
        f"{server}/v1/chat/completions",
        headers={"Authorization": "Bearer sk-test"},
        timeout=60,
        json={
            "model": "tiny-qwen3",
            "messages": [{"role": "user", "content": "hi"}],
            "modalities": ["text", "audio"],
            "audio": {"voice": "alloy"},
        },
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "audio.voice" and "valid voices: Aiden, Chelsie, Ethan" in err["message"]


def test_seeded_sampled_talker_through_serve_equals_the_official_generate(
    ray_stages, client, tiny_qwen3, media, media_dir
):
    """A sampled Talker and code predictor with a seed (greedy Thinker): through the app's deployment handles all 16
    codebooks of every frame equal the official generate with that seed (its global RNG); over HTTP the same
    sampling_params_list gives the same text and that waveform, streamed."""
    from omni.reference import reference_generate
    from omni.types import TALKER_DEFAULT_SAMPLING, ChatRequest, ImagePart, Message, SamplingParams, TextPart

    talker = dict(temperature=0.9, top_k=50, repetition_penalty=1.05, max_tokens=FRAMES, seed=7)
    # what the HTTP request below asks for: the Talker's defaults with these fields
    req = ChatRequest(
        [Message("user", [ImagePart(media["image"]), TextPart("Describe it aloud.")])],
        sampling=SamplingParams(max_tokens=8),
        speak=True,
        voice="Aiden",
        talker_sampling=dataclasses.replace(TALKER_DEFAULT_SAMPLING, **talker),
    )
    ref = reference_generate(tiny_qwen3, req, seed=7)
    out = asyncio.run(ray_stages.run(dataclasses.replace(req)))
    assert out.token_ids == ref.token_ids and out.codec_ids == ref.codec_ids and len(ref.codec_ids) == FRAMES - 1

    stream = client.chat.completions.create(
        model="tiny-qwen3",
        stream=True,
        max_tokens=8,
        temperature=0,
        modalities=["text", "audio"],
        audio={"voice": "Aiden", "format": "pcm16"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri(media_dir, "image.png", "image/png")}},
                    {"type": "text", "text": "Describe it aloud."},
                ],
            }
        ],
        extra_body={"sampling_params_list": [{}, talker]},
    )
    text, pcm = [], []
    for chunk in stream:
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
            audio = ch.delta.model_dump().get("audio") or {}
            if audio.get("data"):
                pcm.append(np.frombuffer(base64.b64decode(audio["data"]), dtype="<i2"))
    assert "".join(text) == ref.text
    wav = np.concatenate(pcm).astype(np.float32) / 32768
    assert wav.shape == ref.waveform.shape
    assert np.abs(wav - ref.waveform).max() <= MAX_STREAM_ERROR + 1e-4 + 1 / 32768  # PCM16 rounding on top
