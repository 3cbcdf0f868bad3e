"""The HTTP app on a real uvicorn server, driven by the official `openai` SDK and raw httpx, in front of the real
in-process Pipeline on the tiny checkpoint. The failure modes a real model cannot be made to show on demand are in
test_http_failures.py."""

import base64
import io
import wave

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omni.prompt import DEFAULT_SYSTEM_PROMPT
from omni.serve.api.audio_io import pcm16_bytes
from omni.serve.api.convert import ConvertOptions, to_chat_request
from omni.serve.api.local_server import LocalServer
from omni.serve.api.metrics import STALL_OK_S
from omni.serve.api.protocol import ChatCompletionRequest
from omni.serve.api.server import ServerSettings, build_fastapi

KEY = "sk-test-key"
TALKER = {"max_tokens": 48}  # the random tiny Talker rarely stops on its own: bound the speech
SPEAK = {"sampling_params_list": [{}, TALKER]}
SAMPLES_PER_CODE = 480  # 24 kHz / 50 codes per second


@pytest.fixture(scope="module")
def server(pipeline):
    settings = ServerSettings(served_model_name="qwen-omni-tiny", api_key=KEY, max_body_bytes=4 * 2**20, max_tokens=512)
    with LocalServer(build_fastapi(pipeline, settings)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120, **kw)


def data_uri(path, mime):
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def read_wav(raw: bytes) -> bytes:
    with wave.open(io.BytesIO(raw)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        return w.readframes(w.getnframes())


def direct(server, pipeline, body):
    """The same request through Pipeline.run in process (on the server's loop): the HTTP layer's oracle."""
    req = ChatCompletionRequest.model_validate(body)
    chat = to_chat_request(req, "direct", ConvertOptions(max_tokens_limit=512, voices=tuple(pipeline.voices)))
    return server.call(pipeline.run(chat))


def metric_samples(server) -> dict:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


# ---------------------------------------------------------------------------------------------------- happy paths
def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen-omni-tiny"]
    assert models.data[0].model_extra["root"] == "tiny"


def test_text_non_streaming_equals_the_pipeline(server, pipeline, client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model="qwen-omni-tiny", messages=messages, max_tokens=12)
    ref = direct(server, pipeline, {"messages": messages, "max_tokens": 12})
    assert r.choices[0].message.content == ref.text and ref.text
    assert r.choices[0].message.audio is None
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    assert r.id.startswith("chatcmpl-") and r.model == "qwen-omni-tiny"


def test_text_and_audio_non_streaming_is_a_wav_of_the_codes(server, pipeline, client, stop_codes):
    messages = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(
        model="qwen-omni-tiny",
        messages=messages,
        max_tokens=8,
        seed=3,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        extra_body=SPEAK,
    )
    audio = r.choices[0].message.audio
    pcm = read_wav(base64.b64decode(audio.data))
    ref = direct(
        server,
        pipeline,
        {
            "messages": messages,
            "max_tokens": 8,
            "seed": 3,
            "modalities": ["text", "audio"],
            "audio": {"voice": "Ethan"},
            **SPEAK,
        },
    )
    codes = [c for c in ref.codec_ids if c not in stop_codes]
    assert 0 < len(codes) <= TALKER["max_tokens"]
    assert len(pcm) // 2 == SAMPLES_PER_CODE * len(codes)
    assert pcm == pcm16_bytes(ref.waveform)  # bit-exact: the same seed gives the same speech
    assert r.choices[0].message.content == ref.text == audio.transcript
    assert audio.id.startswith("audio_") and audio.expires_at > r.created

    raw = client.chat.completions.create(
        model="qwen-omni-tiny",
        messages=messages,
        max_tokens=8,
        seed=3,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"},
        extra_body=SPEAK,
    )
    assert base64.b64decode(raw.choices[0].message.audio.data) == pcm


def test_streaming_text_and_audio_matches_non_streaming(server, client):
    kw = dict(
        model="qwen-omni-tiny",
        messages=[{"role": "user", "content": "Sing."}],
        max_tokens=8,
        seed=4,
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "wav"},
    )
    whole = client.chat.completions.create(**kw, extra_body=SPEAK)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}, extra_body=SPEAK)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds, text, audio = [], [], []
    for c in chunks[1:]:
        if not c.choices:
            continue
        d = c.choices[0].delta
        if d.content:
            kinds.append("text")
            text.append(d.content)
        a = d.audio or (d.model_extra or {}).get("audio")
        if a is not None:
            a = a if isinstance(a, dict) else a.model_dump()
            kinds.append("audio")
            audio.append(base64.b64decode(a["data"]))
            assert a["id"] == f"audio_{c.id.removeprefix('chatcmpl-')}"
    assert "".join(text) == whole.choices[0].message.content
    assert b"".join(audio) == read_wav(base64.b64decode(whole.choices[0].message.audio.data))
    assert "text" in kinds and "audio" in kinds  # in the order the backend produced them
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1

    # on the wire: `data: {json}` events and a final `data: [DONE]`
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
        json={**kw, "stream": True, **SPEAK},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_vllm_omni_shaped_request(server, media_dir):
    body = {
        "model": "qwen-omni-tiny",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
            {
                "role": "user",
                "content": [
                    {"type": "audio_url", "audio_url": {"url": data_uri(media_dir / "speech.wav", "audio/wav")}},
                    {"type": "image_url", "image_url": {"url": data_uri(media_dir / "image.png", "image/png")}},
                    {
                        "type": "video_url",
                        "video_url": {"url": data_uri(media_dir / "clip.mp4", "video/mp4"), "num_frames": 4},
                    },
                    {"type": "text", "text": "What do you see and hear?"},
                ],
            },
        ],
        "sampling_params_list": [
            {
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": -1,
                "max_tokens": 10,
                "seed": 42,
                "detokenize": True,
                "repetition_penalty": 1.05,
                "stop_token_ids": [151645],
            },
            {
                "temperature": 0.9,
                "top_p": 0.8,
                "top_k": 40,
                "max_tokens": 48,
                "seed": 42,
                "detokenize": True,
                "repetition_penalty": 1.05,
                "stop_token_ids": [8294],
            },
            {
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": -1,
                "max_tokens": 2048,
                "seed": 42,
                "detokenize": True,
                "repetition_penalty": 1.1,
            },
        ],
        "modalities": ["text", "audio"],
        "mm_processor_kwargs": {"use_audio_in_video": True},
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] and r.json()["usage"]["prompt_tokens"] > 100  # the media's tokens are in the prompt
    pcm = read_wav(base64.b64decode(msg["audio"]["data"]))
    assert len(pcm) > 0 and len(pcm) // 2 % SAMPLES_PER_CODE == 0


# ---------------------------------------------------------------------------------------------------- client errors
def _video_part(data: bytes):
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


BAD = {
    "bad base64": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "%%%not-base64%%%", "format": "wav"}}],
                }
            ]
        },
        400,
        "input_audio.data is not valid base64",
    ),
    "unsupported part": (
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "x"}}]}]},
        400,
        "unsupported content part type 'file'",
    ),
    "corrupt video": (
        {"messages": [{"role": "user", "content": [_video_part(b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 500)]}]},
        400,
        "video",
    ),
    "unknown voice": (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "wav"},
        },
        400,
        "unknown voice 'alloy'; valid voices: Chelsie, Ethan",
    ),
    "max_tokens too large": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
        400,
        "max_tokens=100000 is more than this server allows \\(512\\)",
    ),
    "wrong model": (
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "The model `gpt-4o` does not exist",
    ),
    "no messages": ({"messages": []}, 400, "messages"),
    "bad role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_client_errors_are_4xx_with_an_openai_body(server, client, case):
    body, status, match = BAD[case]
    r = post(server, {"model": "qwen-omni-tiny", "max_tokens": 4, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert __import__("re").search(match, err["message"]), err
    # the SDK maps it to its typed exception
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**{"model": "qwen-omni-tiny", "max_tokens": 4, **body})
    assert e.value.status_code == status
    # and the server keeps serving
    ok = client.chat.completions.create(
        model="qwen-omni-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


RAW_BAD = {  # bodies as sent on the wire (not all are JSON a client library would write), with the param named
    "temperature NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    "temperature Infinity": (
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        "temperature",
    ),
    "top_p -Infinity": (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "top_p"),
    "user content null": (b'{"messages": [{"role": "user", "content": null}]}', "messages[0]"),
    "deep nesting": (
        b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
    ),
    "text part without text": (
        b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
        "messages[0].content",
    ),
    "seed too large": (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1e30}', "seed"),
    "not an object": (b'[1, 2, 3]', None),
    "not utf-8": (b'{"messages": "\xff\xfe"}', None),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_malformed_bodies_are_400_naming_the_param(server, case):
    body, param = RAW_BAD[case]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    "case, param",
    [
        ("unknown voice", "audio.voice"),
        ("bad base64", "messages[0].content[0].input_audio.data"),
        ("unsupported part", "messages[0].content"),
        ("corrupt video", "messages[0].content[0]"),
        ("wrong model", "model"),
    ],
)
def test_errors_name_the_param(server, case, param):
    err = post(server, {"model": "qwen-omni-tiny", **BAD[case][0]}).json()["error"]
    assert err["param"] == param
    assert err["type"] == ("not_found_error" if case == "wrong model" else "invalid_request_error")


def test_auth_and_body_limits(server, client):
    body = {"model": "qwen-omni-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong"):
        r = post(server, body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()

    big = {**body, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    r = post(server, big)
    assert r.status_code == 413 and "more than the 4194304" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert post(server, body).status_code == 200


def test_metrics_after_requests(server, client):
    before = metric_samples(server)
    client.chat.completions.create(
        model="qwen-omni-tiny",
        messages=[{"role": "user", "content": "hey"}],
        max_tokens=4,
        modalities=["text", "audio"],
        extra_body=SPEAK,
    )
    post(server, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    after = metric_samples(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("omni_requests_total", status="200") == 1 and delta("omni_requests_total", status="404") == 1
    assert delta("omni_time_to_first_token_seconds_count") == 1
    assert delta("omni_time_to_first_audio_seconds_count") == 1
    assert delta("omni_request_latency_seconds_count") == 1
    assert delta("omni_stage_latency_seconds_count", stage="end_to_end") == 1
    assert delta("omni_audio_output_seconds_total") > 0 and delta("omni_completion_tokens_total") >= 1
    assert after[("omni_requests_in_flight", ())] == 0 and after[("omni_requests_waiting", ())] == 0
    # vllm-omni's audio metrics: one speech stream, its TTFAP, RTF and playback as a real-time client hears it
    assert delta("omni_audio_ttfp_seconds_count") == 1 and delta("omni_audio_streams_total") == 1
    assert 0 < delta("omni_audio_ttfp_seconds_sum") <= delta("omni_request_latency_seconds_sum")
    assert delta("omni_audio_rtf_count") == 1 and delta("omni_audio_rtf_sum") > 0
    # the gaps a real-time player hears lie inside the request; one stream with less than STALL_OK_S of gaps in all
    # has no gap over it (Playback's own arithmetic: tests/serve/bench/test_bench.py)
    stall = delta("omni_audio_underrun_seconds_sum")
    assert delta("omni_audio_underrun_seconds_count") == 1 and 0 <= stall <= delta("omni_request_latency_seconds_sum")
    assert delta("omni_audio_continuity_ok_total") == 1 or stall > STALL_OK_S
    # every generating stage of the pipeline: steps with their batch sizes and queue times, nothing left running
    for stage in ("thinker", "talker", "vocoder"):
        steps = delta("omni_stage_batch_size_count", stage=stage)
        assert steps >= 1, stage
        assert 1 <= delta("omni_stage_batch_size_sum", stage=stage) / steps <= 64, stage  # mean batch, plausible
        assert delta("omni_stage_queue_seconds_count", stage=stage) >= 1, stage
        assert 0 <= delta("omni_stage_queue_seconds_sum", stage=stage) < delta("omni_request_latency_seconds_sum")
        assert delta("omni_stage_step_seconds_sum", stage=stage) > 0, stage
        assert after[("omni_stage_requests_running", (("stage", stage),))] == 0, stage
        assert after[("omni_stage_requests_waiting", (("stage", stage),))] == 0, stage
