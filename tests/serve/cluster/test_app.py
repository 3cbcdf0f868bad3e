"""The Ray Serve app on the tiny checkpoint, with the official `openai` SDK as its client: `omni serve` in a
subprocess (its own Ray with 2 CPUs, fractional CPUs per replica from configs/serve/tiny.yaml), shared with
test_app_clients, test_app_encoder_cache, test_app_faults and test_app_shutdown (conftest.SharedServer)."""

import asyncio
import base64
import dataclasses
import io
import json
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]

QWEN_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
SPEECH = {"sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 40}]}  # greedy, bounded Talker


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _delta_audio(delta) -> dict:
    """delta.audio as a dict, whether this SDK version declares the field or keeps it as an extra."""
    return delta.model_dump().get("audio") or {}


def _wav(data: bytes):
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


def test_text_equals_reference(client, tiny):
    from omni.reference import reference_generate
    from omni.types import ChatRequest, Message, SamplingParams

    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello, how are you?"}], max_tokens=16, temperature=0
    )
    ref = reference_generate(
        tiny, ChatRequest([Message("user", "Hello, how are you?")], sampling=SamplingParams(max_tokens=16))
    )
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_text_and_speech_non_streaming(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        extra_body=SPEECH,
    )
    audio = r.choices[0].message.audio
    assert audio.transcript == r.choices[0].message.content
    rate, channels, width, frames = _wav(base64.b64decode(audio.data))
    assert (rate, channels, width) == (24000, 1, 2)
    assert frames > 0 and frames % 480 == 0 and frames <= 40 * 480


def _official_speech_request(media, parts, max_tokens, voice, speech_tokens=40):
    """The ChatRequest an HTTP request with these media parts asks for: greedy Thinker, the Talker's defaults made
    greedy (SPEECH), `speech_tokens` codes at most."""
    from omni.types import (
        TALKER_DEFAULT_SAMPLING,
        AudioPart,
        ChatRequest,
        ImagePart,
        Message,
        SamplingParams,
        TextPart,
        VideoPart,
    )

    kinds = {"image": ImagePart, "audio": AudioPart, "video": VideoPart}
    content = [kinds[k](media[k]) for k in parts[:-1]] + [TextPart(parts[-1])]
    return ChatRequest(
        [Message("user", content)],
        sampling=SamplingParams(max_tokens=max_tokens),
        speak=True,
        voice=voice,
        talker_sampling=dataclasses.replace(TALKER_DEFAULT_SAMPLING, temperature=0.0, max_tokens=speech_tokens),
    )


def _handle_stages(pipeline):
    """The composition over the app's deployment handles, as its ingress runs it."""
    from ray import serve

    from omni.serve.cluster.deployments import HandleStages
    from omni.serve.compose import Composition
    from omni.serve.config import load_serve_config

    handle = lambda name: serve.get_deployment_handle(name, app_name="omni")  # noqa: E731
    return Composition(
        HandleStages(
            "tiny",
            load_serve_config("tiny"),
            handle("VisionEncoder"),
            handle("AudioEncoder"),
            handle("Thinker"),
            handle("Vocoder"),
            pipeline.voices,
        )
    )


def test_streaming_text_and_speech_with_media(client, uris, tiny, media, pipeline, stop_codes):
    """An image + audio + video request streamed through the app equals the official generate: the text and its
    token counts over HTTP, the text ids and codec ids through the app's deployment handles (the chain the ingress
    runs), whose waveform is the streamed PCM byte for byte and within MIN_STREAM_SNR_DB (+ PCM_SLACK) of the
    official one."""
    from omni.reference import reference_generate
    from omni.decoders import MIN_STREAM_SNR_DB
    from omni.serve.api.convert import pcm16_bytes

    stream = client.chat.completions.create(
        model="tiny",
        stream=True,
        max_tokens=24,
        temperature=0,
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "pcm16"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uris["image"]}},
                    {"type": "input_audio", "input_audio": {"data": uris["audio_b64"], "format": "wav"}},
                    {"type": "video_url", "video_url": {"url": uris["video"]}},
                    {"type": "text", "text": "What do you see and hear?"},
                ],
            }
        ],
        stream_options={"include_usage": True},
        extra_body=SPEECH,
    )
    text, pcm, usage, finish = [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                text.append(ch.delta.content)
            audio = _delta_audio(ch.delta)
            if audio.get("data"):
                pcm.append(base64.b64decode(audio["data"]))
            finish = ch.finish_reason or finish
    req = _official_speech_request(media, ["image", "audio", "video", "What do you see and hear?"], 24, "Chelsie")
    ref = reference_generate(tiny, req)
    assert "".join(text) == ref.text and finish == ("length" if len(ref.token_ids) == 24 else "stop")
    assert usage.completion_tokens == len(ref.token_ids) and usage.prompt_tokens == len(ref.prompt_ids)
    ray_out = asyncio.run(_handle_stages(pipeline).run(dataclasses.replace(req)))
    assert ray_out.token_ids == ref.token_ids and ray_out.codec_ids == ref.codec_ids
    codes = [c for c in ref.codec_ids if c not in stop_codes]
    assert len(codes) > 12 and b"".join(pcm) == pcm16_bytes(ray_out.waveform)
    assert len(ray_out.waveform) == len(ref.waveform) == 480 * len(codes)
    error = _rms(ray_out.waveform - ref.waveform)
    assert error <= _rms(ref.waveform) * 10 ** (-MIN_STREAM_SNR_DB / 20) + PCM_SLACK, (error, _rms(ref.waveform))


def test_speech_through_ray_equals_the_pipeline(server, client, pipeline, media_dir, stop_codes):
    """The Ray app's speech (its deployments chained by handles, as the ingress runs them) equals the in-process
    pipeline's: text ids and codec ids exactly, PCM within 1e-4 (float32 batch-size-dependent kernels); the HTTP WAV
    is that PCM."""
    from omni.types import TALKER_DEFAULT_SAMPLING, ChatRequest, ImagePart, Message, SamplingParams, TextPart
    from omni.decoders import snr_db
    from omni.encoders.media import MediaPolicy, load_image
    from omni.serve.api.convert import pcm16_bytes

    image = load_image(str(media_dir / "image.png"), MediaPolicy(allowed_local_media_path=str(media_dir)))
    req = ChatRequest(
        [Message("user", [ImagePart(image), TextPart("Describe it aloud.")])],
        sampling=SamplingParams(max_tokens=10),
        speak=True,
        voice="Ethan",
        # what the HTTP request below asks for: the Talker's defaults, greedy, 60 codes at most
        talker_sampling=dataclasses.replace(TALKER_DEFAULT_SAMPLING, temperature=0.0, max_tokens=60),
    )
    ours = asyncio.run(pipeline.run(req))
    ray_out = asyncio.run(_handle_stages(pipeline).run(req))
    assert ray_out.token_ids == ours.token_ids and ray_out.text == ours.text
    assert ray_out.codec_ids == ours.codec_ids and len([c for c in ours.codec_ids if c not in stop_codes]) > 24
    assert ray_out.waveform.shape == ours.waveform.shape
    assert float(np.abs(ray_out.waveform - ours.waveform).max()) < 1e-4 and snr_db(ours.waveform, ray_out.waveform) > 60

    r = client.chat.completions.create(
        model="tiny",
        max_tokens=10,
        temperature=0,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"},
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64,"
                            + base64.b64encode((media_dir / "image.png").read_bytes()).decode()
                        },
                    },
                    {"type": "text", "text": "Describe it aloud."},
                ],
            }
        ],
        extra_body={"sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 60}]},
    )
    assert r.choices[0].message.content == ours.text
    assert base64.b64decode(r.choices[0].message.audio.data) == pcm16_bytes(ray_out.waveform)


def test_vllm_omni_shaped_request(server, uris):
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": QWEN_SYSTEM}]},
            {
                "role": "user",
                "content": [
                    {"type": "audio_url", "audio_url": {"url": uris["audio"]}},
                    {"type": "image_url", "image_url": {"url": uris["image"]}},
                    {"type": "video_url", "video_url": {"url": uris["video"], "num_frames": 4}},
                    {"type": "text", "text": "What is recited in the audio? What is in the image and video?"},
                ],
            },
        ],
        "sampling_params_list": [
            {
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": -1,
                "max_tokens": 12,
                "seed": 42,
                "repetition_penalty": 1.0,
                "detokenize": True,
            },
            {
                "temperature": 0.9,
                "top_p": 0.8,
                "top_k": 40,
                "max_tokens": 48,
                "seed": 42,
                "repetition_penalty": 1.05,
                "stop_token_ids": [8294],
            },
            {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 2048, "seed": 42, "repetition_penalty": 1.1},
        ],
        "modalities": ["text", "audio"],
        "mm_processor_kwargs": {"use_audio_in_video": True},
    }
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"}, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"]
    assert _wav(base64.b64decode(choice["message"]["audio"]["data"]))[0] == 24000


@pytest.mark.parametrize(
    "body,status,param",
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "%%%not-base64", "format": "wav"}}],
                    }
                ]
            },
            400,
            None,
        ),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "x"}}]}]}, 400, None),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "video_url",
                                "video_url": {
                                    "url": "data:video/mp4;base64,"
                                    + base64.b64encode(b"\x00\x00\x00\x18ftypmp42 garbage" * 20).decode()
                                },
                            }
                        ],
                    }
                ]
            },
            400,
            None,
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "modalities": ["text", "audio"],
                "audio": {"voice": "Bob"},
            },
            400,
            "audio.voice",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    if "voice" in json.dumps(body):
        assert "Chelsie" in err["message"] and "Ethan" in err["message"]
    ok = httpx.post(
        f"{server}/v1/chat/completions",
        headers={"Authorization": "Bearer sk-test"},
        timeout=60,
        json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2},
    )
    assert ok.status_code == 200


def test_api_key_required_but_not_for_health(server):
    assert httpx.get(f"{server}/health").status_code == 200
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["message"]


# per sample, RMS: the float32 batch-size-dependent kernels of a batched run (1e-4, the bound of
# test_speech_through_ray_equals_the_pipeline),
# the offline vocoder's tolerance against the official one (1e-4) and the PCM16 rounding (half a step)
PCM_SLACK = 1e-4 + 1e-4 + 0.5 / 32767
