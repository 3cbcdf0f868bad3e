"""The Ray Serve app on the tiny checkpoint (the shared `omni serve`: conftest.SharedServer, as test_app.py) under
many clients: concurrent streams equal to the official path with the encoders batching, clients that go away
mid-stream (every stage frees its work), the README's SDK example, a realtime turn through the ingress."""

import asyncio
import base64
import collections
import concurrent.futures
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import pytest

# the helpers of the golden paths (the shared server's fixtures, server, client and uris, are in conftest.py)
from .test_app import (
    PCM_SLACK,
    SPEECH,
    _delta_audio,
    _official_speech_request,
    _rms,
    _wav,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


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

    def vision_batches() -> tuple[float, float]:
        """(encoder calls of batch size 1, all encoder calls) of the vision encoder, from /metrics."""
        text = httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer sk-test"}).text
        ones = float(re.search(r'omni_encoder_batch_size_bucket\{kind="vision",le="1.0"\} (\S+)', text).group(1))
        return ones, float(re.search(r'omni_encoder_batch_size_count\{kind="vision"\} (\S+)', text).group(1))

    def image_only(burst: int, i: int) -> None:
        img = Image.open(media_dir / "image.png").convert("RGB")
        img.putpixel((1, 1), (burst, i, 99))  # a new image: the encoder cache has not seen it
        buf = io.BytesIO()
        img.save(buf, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Describe."}]
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": content}])

    # whether 8 concurrent requests' images meet in the encoder's batch window depends on how fast the ingress
    # prepares them on a loaded machine: a burst of 8 image-only requests again, at most 3 times, until one batch > 1
    for burst in range(1, 4):
        ones, total = vision_batches()
        if total >= 8 and ones < total:
            break
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(image_only, [burst] * 8, range(8)))
    ones, total = vision_batches()
    assert total >= 8 and ones < total, "no vision encoder batch larger than 1 formed"
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer sk-test"}).text
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

    def leave_at_first_audio(_) -> Optional[list[str]]:
        """None once the first audio came; a stream that ended without any: its last lines (an error event says
        why)."""
        last: collections.deque = collections.deque(maxlen=3)
        with httpx.stream(
            "POST", f"{server}/v1/chat/completions", json=body, timeout=300, headers={"Authorization": "Bearer sk-test"}
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"audio"' in line and '"data"' in line:
                    return None
                last.append(line[:300])
        return list(last)

    def stats() -> dict:
        return {name: h.stats.remote().result() for name, h in handles.items()}

    def idle() -> dict:
        deadline = time.time() + 60
        while True:
            now = stats()
            if (
                now["Thinker"]["running"] == now["Talker"]["running"] == now["Vocoder"]["open"] == 0
                or time.time() > deadline
            ):
                return now
            time.sleep(0.3)

    assert leave_at_first_audio(0) is None  # warm-up: the replicas' memory reaches its working level
    before = idle()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        without_audio = [tail for tail in pool.map(leave_at_first_audio, range(20)) if tail is not None]
    assert not without_audio, without_audio
    after = idle()
    for name in handles:
        assert after[name].get("running", after[name].get("open")) == 0, (name, after[name])

    def back(now) -> bool:
        return all(now[n]["rss_mb"] <= before[n]["rss_mb"] * 1.10 + 30 for n in handles)

    from omni.serve.cluster.deployments import TRIM_EVERY_S

    # freed memory goes back to the OS at the replica's next malloc_trim (every TRIM_EVERY_S; serve/cluster/
    # deployments.py), not at each free: give it three of them
    deadline = time.time() + 3 * TRIM_EVERY_S
    while not back(after) and time.time() < deadline:
        time.sleep(1)
        after = stats()
    assert back(after), (before, after)
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
