"""The Ray Serve app on the tiny checkpoint, with the official `openai` SDK as its client: `omni serve` in a
subprocess (its own Ray with 2 CPUs, fractional CPUs per replica from configs/serve/tiny.yaml), shared with
test_app_faults and test_app_shutdown (conftest.SharedServer)."""

import asyncio
import base64
import concurrent.futures
import dataclasses
import io
import json
import re
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def server(tiny_app):
    """`omni serve` itself, in a subprocess (its own local Ray, --api-key sk-test); this process joins that Ray for
    handles."""
    return tiny_app.get().url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="sk-test", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def uris(media_dir):
    def uri(name, mime):
        return f"data:{mime};base64," + base64.b64encode((media_dir / name).read_bytes()).decode()

    return {
        "image": uri("image.png", "image/png"),
        "audio": uri("speech.wav", "audio/wav"),
        "video": uri("clip.mp4", "video/mp4"),
        "audio_b64": base64.b64encode((media_dir / "speech.wav").read_bytes()).decode(),
    }


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


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# the 8 concurrent requests' media besides their image (the vision encoder batches the images), in turn
MIXES = [[], ["audio"], ["video"], ["audio", "video"]]


def _stage_counters(server) -> dict:
    """{stage: (steps, items)} of the generating stages' loop counters in /metrics, for those already there."""
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer sk-test"}).text
    out = {}
    for stage in ("thinker", "talker", "vocoder"):
        steps = re.search(rf'omni_stage_batch_size_count\{{stage="{stage}"\}} (\S+)', metrics)
        items = re.search(rf'omni_stage_batch_size_sum\{{stage="{stage}"\}} (\S+)', metrics)
        if steps and items and float(steps.group(1)) >= 1:
            out[stage] = (float(steps.group(1)), float(items.group(1)), metrics)
    return out


def test_concurrent_streams_equal_the_official_path_and_encoder_batches(
    client, server, uris, tiny, media, media_dir, tmp_path, stop_codes
):
    """8 concurrent streaming requests, each with an image and some with audio and video, half of them with speech:
    row by row the official generate's text and token counts, and for the speech rows its number of codes (480
    samples each) and its waveform: the streaming error MIN_STREAM_SNR_DB allows, plus PCM_SLACK per sample (a wrong
    code changes its 480 samples by the voice's own amplitude); the vision encoder ran batches > 1. Each request's
    image differs by one pixel, so that the ingress's encoder cache (which would serve a repeated image) sends every
    one to the vision encoder."""
    from PIL import Image

    from omni.reference import reference_generate
    from omni.decoders import MIN_STREAM_SNR_DB
    from omni.encoders.media import MediaPolicy, load_image

    images = []
    for i in range(8):
        img = Image.open(media_dir / "image.png").convert("RGB")
        img.putpixel((0, 0), (37 * i % 256, 255 - i, 7 * i))
        img.save(tmp_path / f"image{i}.png")
        images.append(tmp_path / f"image{i}.png")
    image_uris = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))

    part = {
        "audio": {"type": "input_audio", "input_audio": {"data": uris["audio_b64"], "format": "wav"}},
        "video": {"type": "video_url", "video_url": {"url": uris["video"]}},
    }

    def one(i):
        speak = bool(i % 2)
        stream = client.chat.completions.create(
            model="tiny",
            stream=True,
            max_tokens=6 + i,
            temperature=0,
            **({"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"}} if speak else {}),
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": image_uris[i]}}]
                    + [part[k] for k in MIXES[i % 4]]
                    + [{"type": "text", "text": f"Request {i}: describe."}],
                }
            ],
            stream_options={"include_usage": True},
            extra_body=SPEECH,
        )
        text, pcm, usage, finish = [], [], None, None
        for chunk in stream:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                text.append(ch.delta.content or "")
                if _delta_audio(ch.delta).get("data"):
                    pcm.append(base64.b64decode(_delta_audio(ch.delta)["data"]))
                finish = ch.finish_reason or finish
        return "".join(text), b"".join(pcm), usage, finish

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, (text, pcm, usage, finish) in enumerate(results):
        own = {**media, "image": load_image(str(images[i]), policy)}
        req = _official_speech_request(own, ["image", *MIXES[i % 4], f"Request {i}: describe."], 6 + i, "Ethan")
        req.speak = bool(i % 2)
        ref = reference_generate(tiny, req)
        assert text == ref.text and finish in ("stop", "length"), i
        assert usage.completion_tokens == len(ref.token_ids) and usage.prompt_tokens == len(ref.prompt_ids), i
        if not req.speak:
            assert pcm == b"", i
            continue
        codes = [c for c in ref.codec_ids if c not in stop_codes]
        wav = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767
        assert len(codes) > 12 and len(wav) == len(ref.waveform) == 480 * len(codes), i
        assert _rms(wav - ref.waveform) <= _rms(ref.waveform) * 10 ** (-MIN_STREAM_SNR_DB / 20) + PCM_SLACK, i
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer sk-test"}).text
    ones = float(re.search(r'omni_encoder_batch_size_bucket\{kind="vision",le="1.0"\} (\S+)', metrics).group(1))
    total = float(re.search(r'omni_encoder_batch_size_count\{kind="vision"\} (\S+)', metrics).group(1))
    assert total >= 8 and ones < total, "no vision encoder batch larger than 1 formed"
    assert 'omni_time_to_first_audio_seconds_count' in metrics
    assert re.search(r'omni_stage_latency_seconds_count\{stage="thinker"\} [1-9]', metrics)
    # the generating stages' loop counters, polled by the ingress from the chain every STAGE_STATS_S: wait for them
    deadline = time.time() + 60
    while len(counters := _stage_counters(server)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    assert set(counters) == {"thinker", "talker", "vocoder"}, "the stage counters never reached /metrics"
    for stage, (steps, items, metrics) in counters.items():
        assert 1 <= items / steps <= 8, (stage, steps, items)
        assert re.search(rf'omni_stage_queue_seconds_count\{{stage="{stage}"\}} [1-9]', metrics), stage
        assert re.search(rf'omni_stage_requests_running\{{stage="{stage}"\}} ', metrics), stage


def test_client_disconnect_cancels_in_every_stage(server):
    from ray import serve

    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 3000,
        "stream": True,
        "modalities": ["text", "audio"],
        "sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 4000}],
    }
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": "Bearer sk-test"}
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"audio"' in line and '"data"' in line:
                break  # first audio delta: the client goes away mid-stream
    thinker = serve.get_deployment_handle("Thinker", app_name="omni")
    talker = serve.get_deployment_handle("Talker", app_name="omni")
    deadline = time.time() + 30
    while time.time() < deadline:
        th, tk = thinker.stats.remote().result(), talker.stats.remote().result()
        if th["running"] == 0 and tk["running"] == 0:
            break
        time.sleep(0.2)
    assert th["running"] == 0 and tk["running"] == 0, (th, tk)
    assert th["steps"] < 3000  # it stopped long before max_tokens


def test_twenty_clients_gone_mid_stream_free_every_stage(server):
    """20 concurrent speech streams whose clients leave at their first audio: afterwards no engine holds a row, the
    vocoder no stream, and the replicas' memory is back near its level before (after one warm-up request)."""
    from ray import serve

    handles = {name: serve.get_deployment_handle(name, app_name="omni") for name in ("Thinker", "Talker", "Vocoder")}
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 2000,
        "stream": True,
        "modalities": ["text", "audio"],
        "sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 3000}],
    }

    def leave_at_first_audio(_):
        with httpx.stream(
            "POST", f"{server}/v1/chat/completions", json=body, timeout=300, headers={"Authorization": "Bearer sk-test"}
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"audio"' in line and '"data"' in line:
                    return True
        return False

    def idle() -> dict:
        deadline = time.time() + 60
        while True:
            stats = {name: h.stats.remote().result() for name, h in handles.items()}
            if (
                stats["Thinker"]["running"] == stats["Talker"]["running"] == stats["Vocoder"]["open"] == 0
                or time.time() > deadline
            ):
                return stats
            time.sleep(0.3)

    assert leave_at_first_audio(0)  # warm-up: the replicas' memory reaches its working level
    before = idle()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert all(pool.map(leave_at_first_audio, range(20)))
    after = idle()
    for name in handles:
        assert after[name].get("running", after[name].get("open")) == 0, (name, after[name])
        assert after[name]["rss_mb"] <= before[name]["rss_mb"] * 1.10 + 30, (name, before[name], after[name])
    assert after["Thinker"]["steps"] - before["Thinker"]["steps"] < 20 * 2000  # nobody ran to max_tokens


def test_readme_sdk_example_runs_against_the_server(server):
    """The README's OpenAI SDK example, as written, against `omni serve` (only its address and key changed)."""
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and 'api_key="unused"' in code
    code = code.replace("http://127.0.0.1:8000", server).replace('api_key="unused"', 'api_key="sk-test"')
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"\d+\.\d\d s of speech", out.stdout)
    assert float(re.search(r"(\d+\.\d\d) s of speech", out.stdout).group(1)) > 0
    hello = REPO / "hello.wav"
    try:
        assert _wav(hello.read_bytes())[:3] == (24000, 1, 2)
    finally:
        hello.unlink(missing_ok=True)


def test_realtime_text_turn_through_the_ingress(server, client):
    """/v1/realtime on the Serve app's ingress (a WebSocket through Ray Serve's proxy), with the official SDK's
    realtime client: a text turn equals the chat completion of the same conversation."""
    import openai

    async def go():
        rt = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="sk-test", max_retries=0)
        async with rt.realtime.connect(model="tiny") as conn:
            await conn.session.update(
                session={
                    "type": "realtime",
                    "output_modalities": ["text"],
                    "max_output_tokens": 12,
                    "audio": {"input": {"turn_detection": None}},
                }
            )
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there."}]}
            )
            await conn.response.create()
            text, kinds = [], []
            while True:
                ev = json.loads(await asyncio.wait_for(conn.recv_bytes(), 120))
                kinds.append(ev["type"])
                if ev["type"] == "response.output_text.delta":
                    text.append(ev["delta"])
                if ev["type"] == "response.done":
                    return "".join(text), ev, kinds

    text, done, kinds = asyncio.run(go())
    assert kinds[0] == "session.created" and "error" not in kinds, kinds
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there."}], max_tokens=12
    )
    assert text == r.choices[0].message.content and text
    assert done["response"]["usage"]["input_tokens"] == r.usage.prompt_tokens
