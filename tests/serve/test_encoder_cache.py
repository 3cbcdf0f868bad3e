"""The encoder output cache (serve/encoder_cache.py) in the in-process pipeline and its HTTP app: a hit is the fresh
encode's tensors, a resent image makes no encoder call and the reply keeps the official path's ids, the byte bound
evicts least recently used entries, and /metrics counts hits and misses."""

import asyncio
import base64
import io
import re

import httpx
import numpy as np
import torch
from PIL import Image

from omni.reference import reference_generate
from omni.types import (
    AudioItem,
    AudioPart,
    ChatRequest,
    ImagePart,
    MediaEmbeddings,
    Message,
    PreparedPrompt,
    SamplingParams,
    TextPart,
)
from omni.serve.api.server import build_fastapi
from omni.serve.config import PipelineConfig
from omni.serve.encoder_cache import EncoderCache, item_key


def unique_image(seed: int) -> Image.Image:
    """An image no other test sends (the session's pipeline, and its cache, are shared)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8), "RGB")


def image_request(img, text="Describe the image.", audio=None) -> ChatRequest:
    parts = [ImagePart(img)] + ([AudioPart(audio)] if audio is not None else []) + [TextPart(text)]
    return ChatRequest([Message("user", parts)], sampling=SamplingParams(max_tokens=10))


class CountingEncoders:
    """Counts the items the pipeline's towers encode."""

    def __init__(self, pipeline, monkeypatch):
        self.items = {"vision": 0, "audio": 0}
        for name, enc, method in (
            ("vision", pipeline.stages.vision, "encode_with_deepstack"),
            ("audio", pipeline.stages.audio, "encode"),
        ):  # what encode_prompt calls
            monkeypatch.setattr(enc, method, self._wrap(name, getattr(enc, method)))

    def _wrap(self, name, fn):
        def encode(items):
            self.items[name] += len(items)
            return fn(items)

        return encode


def test_hit_equals_a_fresh_encode(pipeline, speech):
    req = image_request(unique_image(1), audio=speech)
    prompt = asyncio.run(pipeline.stages.prepare(req))
    fresh = asyncio.run(pipeline.stages.encode(prompt))
    calls = []

    async def encode(p: PreparedPrompt) -> MediaEmbeddings:
        calls.append((len(p.images), len(p.audios)))
        return await pipeline.stages.encode(p)

    cache = EncoderCache(2**30)
    first = asyncio.run(cache.encode(prompt, encode))
    hit = asyncio.run(cache.encode(prompt, encode))
    assert calls == [(1, 1)]  # the second call was served from the cache alone
    for got in (first, hit):
        assert torch.equal(got.images[0], fresh.images[0]) and torch.equal(got.audios[0], fresh.audios[0])
    assert cache.stats()["hits"] == {"image": 1, "video": 0, "audio": 1}
    assert cache.stats()["misses"] == {"image": 1, "video": 0, "audio": 1}


def test_resent_image_makes_no_encoder_call_and_keeps_the_official_ids(pipeline, speech, monkeypatch):
    counted = CountingEncoders(pipeline, monkeypatch)
    img = unique_image(2)
    first = asyncio.run(pipeline.run(image_request(img)))
    assert counted.items == {"vision": 1, "audio": 0}
    # the next turn resends the image with new audio: only the audio is encoded (scaled: audio of its own, which
    # no other test in this process has put into the shared pipeline's cache)
    turn2 = image_request(img, "And what do you hear?", audio=speech * 0.875)
    second = asyncio.run(pipeline.run(turn2))
    assert counted.items == {"vision": 1, "audio": 1}
    again = asyncio.run(pipeline.run(turn2))
    assert counted.items == {"vision": 1, "audio": 1}  # nothing encoded at all
    assert first.token_ids == reference_generate(pipeline.loaded, image_request(img)).token_ids
    ref2 = reference_generate(pipeline.loaded, turn2)
    assert second.token_ids == again.token_ids == ref2.token_ids


def test_same_item_twice_in_one_prompt_is_encoded_once(pipeline, monkeypatch):
    counted = CountingEncoders(pipeline, monkeypatch)
    img = unique_image(3)
    req = ChatRequest(
        [Message("user", [ImagePart(img), ImagePart(img), TextPart("Two of the same?")])],
        sampling=SamplingParams(max_tokens=6),
    )
    out = asyncio.run(pipeline.run(req))
    assert counted.items["vision"] == 1
    assert out.token_ids == reference_generate(pipeline.loaded, req).token_ids


def _audio(n_frames: int, value: float) -> AudioItem:
    return AudioItem(torch.full((128, n_frames), value))


def _prompt(*audios) -> PreparedPrompt:
    return PreparedPrompt(torch.zeros(1, dtype=torch.long), [], [], list(audios), None)


def test_byte_bound_evicts_least_recently_used():
    encoded = []

    async def encode(p: PreparedPrompt) -> MediaEmbeddings:  # one [10, 8] float32 (320 bytes) per item
        encoded.extend(float(a.features[0, 0]) for a in p.audios)
        return MediaEmbeddings(audios=[torch.full((10, 8), float(a.features[0, 0])) for a in p.audios])

    a, b, c = _audio(20, 1.0), _audio(20, 2.0), _audio(20, 3.0)
    cache = EncoderCache(max_bytes=2 * 320)
    for item in (a, b, a, c):  # a is used again after b: b is the least recently used when c comes
        out = asyncio.run(cache.encode(_prompt(item), encode))
        assert float(out.audios[0][0, 0]) == float(item.features[0, 0])
    assert encoded == [1.0, 2.0, 3.0] and len(cache) == 2 and cache.bytes == 640
    assert cache.stats()["evictions"] == 1
    asyncio.run(cache.encode(_prompt(b), encode))  # b was evicted: encoded again
    asyncio.run(cache.encode(_prompt(c), encode))  # c stayed
    assert encoded == [1.0, 2.0, 3.0, 2.0]
    # an output larger than the whole bound is returned but not kept; a zero bound turns the cache off
    small = EncoderCache(max_bytes=100)
    asyncio.run(small.encode(_prompt(a), encode))
    assert len(small) == 0 and small.bytes == 0
    off = EncoderCache(0)
    for _ in range(2):
        asyncio.run(off.encode(_prompt(a), encode))
    assert encoded[-3:] == [1.0, 1.0, 1.0]


def test_key_is_the_content_not_the_object():
    assert item_key("audio", _audio(20, 1.0)) == item_key("audio", _audio(20, 1.0))
    assert item_key("audio", _audio(20, 1.0)) != item_key("audio", _audio(21, 1.0))  # the length is in the key
    assert item_key("audio", _audio(20, 1.0)) != item_key(
        "audio", AudioItem(torch.full((128, 20), 1.0, dtype=torch.float64))
    )
    assert PipelineConfig().encoder_cache_bytes == 256 * 2**20


def _png_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _counter(text: str, name: str, kind: str) -> float:
    m = re.search(rf'{name}_total\{{kind="{kind}"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_hits_and_misses(pipeline):
    app = build_fastapi(pipeline)
    body = {
        "model": pipeline.model_name,
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png_uri(unique_image(4))}},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ],
    }

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            before = (await c.get("/metrics")).text
            for _ in range(2):
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
            return before, (await c.get("/metrics")).text

    before, after = asyncio.run(go())
    for name, delta in (("omni_encoder_cache_hits", 1), ("omni_encoder_cache_misses", 1)):
        assert _counter(after, name, "image") - _counter(before, name, "image") == delta, name
    assert re.search(r"^omni_encoder_cache_bytes [1-9]", after, re.M)
    assert re.search(r"^omni_encoder_cache_entries [1-9]", after, re.M)


def test_qwen3_hit_keeps_the_deepstack_and_the_official_ids(pipeline_qwen3, monkeypatch):
    """Qwen3's vision tower also gives deepstack features: a hit returns both, and the reply keeps the official ids."""
    counted = CountingEncoders(pipeline_qwen3, monkeypatch)
    img = unique_image(5)
    prompt = asyncio.run(pipeline_qwen3.stages.prepare(image_request(img)))
    fresh = asyncio.run(pipeline_qwen3.stages.encode(prompt))
    assert len(fresh.image_deepstack) == 1
    outs = [asyncio.run(pipeline_qwen3.run(image_request(img))) for _ in range(2)]
    assert counted.items["vision"] == 2  # the fresh encode above, then the first request; the second one: none
    hit = asyncio.run(pipeline_qwen3.encoder_cache.encode(prompt, pipeline_qwen3.stages.encode))
    assert counted.items["vision"] == 2
    assert torch.equal(hit.images[0], fresh.images[0]) and torch.equal(hit.image_deepstack[0], fresh.image_deepstack[0])
    ref = reference_generate(pipeline_qwen3.loaded, image_request(img))
    assert outs[0].token_ids == outs[1].token_ids == ref.token_ids


def test_a_realtime_turn_encodes_only_its_new_audio(pipeline, speech, monkeypatch):
    """/v1/realtime shares the cache: turn 2's prompt holds turn 1's question again, and only its own is encoded."""
    import librosa
    import openai

    from omni.serve.api.local_server import LocalServer
    from omni.serve.api.server import ServerSettings

    pcm24 = librosa.resample(speech, orig_sr=16000, target_sr=24000)
    questions = [(np.clip(pcm24 * gain, -1, 1) * 32767).astype("<i2").tobytes() for gain in (0.9, 0.7)]  # unique
    counted = CountingEncoders(pipeline, monkeypatch)
    hits0 = pipeline.encoder_cache.stats()["hits"]["audio"]
    per_turn = []

    async def talk(url):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async with client.realtime.connect(model=pipeline.model_name) as conn:
            await conn.session.update(
                session={
                    "type": "realtime",
                    "output_modalities": ["text"],
                    "audio": {"input": {"turn_detection": None}},
                }
            )
            for pcm in questions:
                for i in range(0, len(pcm), 9600):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
                await conn.input_audio_buffer.commit()
                await conn.response.create(response={"max_output_tokens": 3})
                while True:
                    ev = await asyncio.wait_for(conn.recv(), 120)
                    assert ev.type != "error", ev
                    if ev.type == "response.done":
                        assert ev.response.status in ("completed", "incomplete"), ev.response
                        break
                per_turn.append(counted.items["audio"])

    with LocalServer(build_fastapi(pipeline, ServerSettings())) as server:
        asyncio.run(talk(f"http://127.0.0.1:{server.port}"))
    assert per_turn == [1, 2]  # turn 1: its question; turn 2: its own only, turn 1's came from the cache
    assert pipeline.encoder_cache.stats()["hits"]["audio"] - hits0 == 1
