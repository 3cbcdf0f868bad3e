"""The HTTP layer, unchanged, in front of the in-process pipeline on the tiny Qwen3-Omni (and its text-only variant):
the same fields, voices validated per model (an unknown voice is a 400 naming this model's), /v1/models lists the
served model, streamed speech is the pipeline's, a request for audio from a model without a talker is a 400."""

import asyncio
import base64
import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from omni.types import TALKER_DEFAULT_SAMPLING, ChatRequest, Message, SamplingParams
from omni.serve.api.audio_io import pcm16_bytes
from omni.serve.api.server import ServerSettings, build_fastapi

SPEAK = {"modalities": ["text", "audio"], "sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 12}]}


@pytest.fixture(scope="module")
def http(pipeline_qwen3):
    with TestClient(build_fastapi(pipeline_qwen3, ServerSettings())) as client:
        yield client


def test_models_lists_the_served_model(http):
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny-qwen3"]


def test_unknown_voice_is_a_400_naming_this_models_voices(http):
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-qwen3",
            "messages": [{"role": "user", "content": "hi"}],
            "audio": {"voice": "alloy"},
            **SPEAK,
        },
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "audio.voice" and "valid voices: Aiden, Chelsie, Ethan" in err["message"]


def test_streamed_speech_is_the_pipelines(http, pipeline_qwen3):
    body = {
        "model": "tiny-qwen3",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "audio": {"voice": "Aiden", "format": "pcm16"},
        **SPEAK,
    }
    text, pcm = [], []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                delta = choice["delta"]
                text.append(delta.get("content") or "")
                if (delta.get("audio") or {}).get("data"):
                    pcm.append(base64.b64decode(delta["audio"]["data"]))
    req = ChatRequest(
        [Message("user", "Say something.")],
        sampling=SamplingParams(max_tokens=6),
        speak=True,
        voice="Aiden",
        talker_sampling=dataclasses.replace(TALKER_DEFAULT_SAMPLING, temperature=0.0, max_tokens=12),
    )
    ours = asyncio.run(pipeline_qwen3.run(req))
    assert "".join(text) == ours.text
    assert len(pcm[0]) == 2 * (2 * 1920 - 555)  # the first packet after 2 frames, PCM16
    assert b"".join(pcm) == pcm16_bytes(ours.waveform) and len(ours.waveform) == 11 * 1920 - 555


def test_text_only_model_serves_text_and_refuses_audio(tmp_path_factory):
    from omni.tiny_qwen3 import build_qwen3_checkpoint
    from omni.serve.pipeline import Pipeline

    path = build_qwen3_checkpoint(tmp_path_factory.mktemp("thinking"), audio_output=False)
    with TestClient(
        build_fastapi(Pipeline.from_pretrained(str(path)), ServerSettings(served_model_name="q3-text"))
    ) as client:
        ok = client.post(
            "/v1/chat/completions",
            json={"model": "q3-text", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["audio"] is None
        r = client.post(
            "/v1/chat/completions",
            json={"model": "q3-text", "max_tokens": 4, **SPEAK, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code == 400 and "no speech output" in r.json()["error"]["message"]


def test_speech_endpoint_frames_equal_the_official_talker_on_the_forced_reply(http, pipeline_qwen3, tiny_qwen3):
    """POST /v1/audio/speech on Qwen3: the reply forced to `input` (one prefill, then every hand-off); its frames (all
    16 codebooks) are the official generate's, teacher-forced over the same ids, and the endpoint's PCM is the
    pipeline run's."""
    from omni.reference import reference_generate
    from omni.serve.api.convert import ConvertOptions, to_speech_request
    from omni.serve.api.protocol import SpeechRequest

    text = "Hello there, how are you today?"
    greedy = {"sampling_params_list": [None, {"temperature": 0.0, "max_tokens": 40}]}
    r = http.post(
        "/v1/audio/speech",
        json={"model": "tiny-qwen3", "input": text, "voice": "Aiden", "response_format": "pcm", **greedy},
    )
    assert r.status_code == 200, r.text
    req = to_speech_request(
        SpeechRequest(input=text, voice="Aiden", response_format="pcm", **greedy),
        "oracle",
        ConvertOptions(voices=tuple(pipeline_qwen3.voices), default_speech_tokens=40),
    )
    ours = asyncio.run(pipeline_qwen3.run(req))
    tok = tiny_qwen3.processor.tokenizer  # the forced reply from the tokenizer, not from the code under test
    reply = list(tok(text, add_special_tokens=False).input_ids) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert pipeline_qwen3.thinker.reply_ids(text) == reply
    ref = reference_generate(tiny_qwen3, req, forced_reply_ids=reply)  # tests/omni/test_reference_forced.py checks it
    assert ours.text == text and ours.token_ids == ref.token_ids == reply
    assert ours.codec_ids == ref.codec_ids and len(ours.codec_ids) > 4 and len(ours.codec_ids[0]) == 16
    assert r.content == pcm16_bytes(ours.waveform)
