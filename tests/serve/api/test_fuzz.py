"""Property-based fuzzing of POST /v1/chat/completions (hypothesis): request bodies, valid and invalid, with media
parts of random bytes, against the real HTTP app over the in-process pipeline on the tiny checkpoint. Whatever the
body, the answer is never a 5xx, every error is OpenAI's error body, and the server keeps serving."""

import base64
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni.serve.api.local_server import LocalServer
from omni.serve.api.server import ServerSettings, build_fastapi

pytestmark = pytest.mark.slow
KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def server(pipeline):
    # small limits keep each valid example fast: at most 6 text tokens, 16 codec tokens of speech
    s = ServerSettings(
        api_key=KEY, max_tokens=6, default_max_tokens=4, default_speech_tokens=16, max_body_bytes=2 * 2**20
    )
    with LocalServer(build_fastapi(pipeline, s)) as srv:
        yield srv


numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e308, -0.0]),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)
MIMES = ["image/png", "image/jpeg", "audio/wav", "audio/mpeg", "video/mp4", "application/octet-stream", ""]


@st.composite
def media_part(draw):
    raw = draw(st.binary(max_size=2048))
    if draw(st.booleans()):  # a real container header in front of random bytes reaches deeper into the decoders
        raw = (
            draw(
                st.sampled_from(
                    [
                        b"\x89PNG\r\n\x1a\n",
                        b"RIFF\x24\x00\x00\x00WAVEfmt ",
                        b"\x00\x00\x00\x18ftypmp42",
                        b"\x1aE\xdf\xa3",
                        b"ID3\x03\x00",
                        b"\xff\xd8\xff\xe0",
                    ]
                )
            )
            + raw
        )
    b64 = base64.b64encode(raw).decode()
    uri = f"data:{draw(st.sampled_from(MIMES))};base64,{b64}"
    kind = draw(st.sampled_from(["image_url", "audio_url", "video_url", "input_audio"]))
    if kind == "input_audio":
        return {
            "type": kind,
            "input_audio": {
                "data": draw(st.sampled_from([b64, uri, "%%%"])),
                "format": draw(st.sampled_from(["wav", "mp3", "x"])),
            },
        }
    inner = {"url": draw(st.sampled_from([uri, "file:///etc/passwd", "http://127.0.0.1/x.png", "", "nope"]))}
    if kind == "video_url" and draw(st.booleans()):
        inner["num_frames"] = draw(numbers)
    return {"type": kind, kind: draw(st.sampled_from([inner, inner["url"], None, 7]))}


part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=40), numbers)}),
    media_part(),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "foo"]), numbers, max_size=3),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "", None])},
    optional={"content": st.one_of(st.text(max_size=40), st.none(), st.lists(part, max_size=3), numbers)},
)
json_values = st.recursive(
    st.one_of(numbers, st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), json_values)},
    optional={
        "model": st.sampled_from([None, "tiny", "other"]),
        "temperature": numbers,
        "top_p": numbers,
        "top_k": numbers,
        "max_tokens": numbers,
        "max_completion_tokens": numbers,
        "seed": numbers,
        "repetition_penalty": numbers,
        "stream": st.booleans(),
        "n": numbers,
        "modalities": st.one_of(st.lists(st.sampled_from(["text", "audio", "video"]), max_size=3), numbers),
        "audio": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "voice": st.sampled_from(["Chelsie", "alloy", "", None]),
                    "format": st.sampled_from(["wav", "pcm16", "mp3", 3]),
                },
            ),
            numbers,
        ),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20), numbers),
        "stop_token_ids": st.one_of(st.lists(numbers, max_size=3), numbers),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": numbers}), numbers),
        "mm_processor_kwargs": st.one_of(st.fixed_dictionaries({"use_audio_in_video": numbers}), numbers),
        "sampling_params_list": st.one_of(
            st.lists(
                st.one_of(
                    st.none(),
                    st.dictionaries(
                        st.sampled_from(["temperature", "top_k", "max_tokens", "seed", "stop_token_ids"]),
                        numbers,
                        max_size=3,
                    ),
                ),
                max_size=4,
            ),
            numbers,
        ),
        "extra": json_values,
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=body)
def test_no_body_gets_a_5xx(server, body):
    raw = json.dumps(body, allow_nan=True).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=headers, timeout=120)
    assert r.status_code < 500, (r.status_code, r.text[:500], raw[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in r.text or "server_error" not in r.text


def test_server_still_serves_after_the_fuzzing(server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
