"""The encoder cache in the Ray app: it lives in the ingress replica, so an image sent again reaches no encoder
deployment (the ingress's per-item encoder-batch metric does not move) and the reply keeps the official path's ids.
Shares test_app's `omni serve` (conftest.SharedServer)."""

import base64
import io
import re

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer sk-test"}


def _metric(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def test_resent_image_reaches_no_encoder_deployment(tiny_app, tiny):
    import openai

    from omni.reference import reference_generate
    from omni.types import ChatRequest, ImagePart, Message, SamplingParams, TextPart

    server = tiny_app.get().url
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-test", timeout=120, max_retries=0)
    img = Image.fromarray(np.random.default_rng(11).integers(0, 255, (84, 112, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Describe it."}],
        }
    ]

    def scrape():
        text = httpx.get(f"{server}/metrics", headers=KEY).text
        return (
            _metric(text, r'omni_encoder_batch_size_count\{kind="vision"\} (\S+)'),
            _metric(text, r'omni_encoder_cache_hits_total\{kind="image"\} (\S+)'),
            _metric(text, r'omni_encoder_cache_misses_total\{kind="image"\} (\S+)'),
        )

    calls0, hits0, misses0 = scrape()
    replies = [
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0) for _ in range(2)
    ]
    calls, hits, misses = scrape()
    assert (calls - calls0, hits - hits0, misses - misses0) == (1, 1, 1)  # one vision item encoded, one cached
    ref = reference_generate(
        tiny,
        ChatRequest(
            [Message("user", [ImagePart(img.convert("RGB")), TextPart("Describe it.")])],
            sampling=SamplingParams(max_tokens=8),
        ),
    )
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content == ref.text
    assert replies[1].usage.completion_tokens == len(ref.token_ids)
