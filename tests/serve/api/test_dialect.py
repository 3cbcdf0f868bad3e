"""`--api-dialect vllm-omni`: the response shapes vllm-omni's clients read, driven by a client written from their
description (streamed chunks carry `modality`, an audio chunk is a base64 WAV in `delta.content`; a whole reply has
its text and its audio as two choices; the voice comes as `speaker`). The default dialect stays OpenAI's."""

import base64
import io
import json
import wave

import httpx
import pytest

from omni.serve.api.convert import ConvertOptions, to_chat_request
from omni.serve.api.local_server import LocalServer
from omni.serve.api.protocol import ChatCompletionRequest
from omni.serve.api.server import ServerSettings, build_fastapi

BODY = {
    "model": "Qwen/Qwen2.5-Omni-7B",
    "messages": [{"role": "user", "content": "Say something."}],
    "max_tokens": 8,
    "modalities": ["text", "audio"],
    "speaker": "Ethan",
    "sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 48}],
}


@pytest.fixture(scope="module")
def server(pipeline):
    settings = ServerSettings(served_model_name="Qwen/Qwen2.5-Omni-7B", api_dialect="vllm-omni")
    with LocalServer(build_fastapi(pipeline, settings)) as s:
        yield s


def wav_frames(data: bytes) -> bytes:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        return w.readframes(w.getnframes())


def test_vllm_omni_streaming_and_whole_shapes(server, pipeline):
    want = server.call(
        pipeline.run(
            to_chat_request(
                ChatCompletionRequest.model_validate(BODY), "ref", ConvertOptions(voices=tuple(pipeline.voices))
            )
        )
    )
    assert want.waveform is not None and len(want.waveform) > 0
    text, audio, modalities = [], b"", set()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**BODY, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            modalities.add(chunk["modality"])
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if not content:
                    continue
                if chunk["modality"] == "audio":
                    audio += wav_frames(base64.b64decode(content))
                else:
                    text.append(content)
    assert modalities == {"text", "audio"}
    assert "".join(text) == want.text
    assert len(audio) // 2 == len(want.waveform)

    whole = httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=120).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert whole["choices"][0]["message"]["content"] == want.text and whole["choices"][0]["message"]["audio"] is None
    assert wav_frames(base64.b64decode(whole["choices"][1]["message"]["audio"]["data"])) == audio
    assert "modality" not in json.dumps(whole)


def test_openai_dialect_chunks_have_no_modality():
    from omni.types import TextDelta
    from omni.serve.api.convert import Completion

    chunk = Completion("x", "m").feed(TextDelta("hi", [1]))[0]
    assert "modality" not in json.loads(chunk.model_dump_json())
    vllm = Completion("x", "m", dialect="vllm-omni").feed(TextDelta("hi", [1]))[0]
    assert json.loads(vllm.model_dump_json())["modality"] == "text"
