"""/v1/realtime in front of the in-process pipeline on the tiny Qwen3-Omni (MoE Thinker, Talker + code predictor,
Code2Wav), with the official SDK's realtime client: a text turn equals the official transformers path, a committed
spoken turn's audio deltas equal the chat completion's speech for the same audio."""

import base64

import openai
import pytest

from omni.reference import reference_generate
from omni.serve.api.audio_io import wav_header
from omni.serve.api.local_server import LocalServer
from omni.serve.api.server import ServerSettings, build_fastapi

from .test_realtime import (
    DEADLINE,
    KEY,
    MODEL,
    append,
    chat_request,
    of,
    run,
    say,
    sdk,
    setup,
    spoken,  # noqa: F401 (the espeak-ng question, a fixture)
    until,
)


@pytest.fixture(scope="module")
def server(pipeline_qwen3):
    settings = ServerSettings(served_model_name=MODEL, api_key=KEY, max_tokens=512)
    with LocalServer(build_fastapi(pipeline_qwen3, settings)) as s:
        yield s


def test_text_and_spoken_turns(server, tiny_qwen3, spoken):  # noqa: F811
    async def go():
        async with sdk(server) as conn:
            await setup(
                conn,
                output_modalities=["text"],
                max_output_tokens=10,
                temperature=0,
                seed=3,
                max_output_audio_tokens=12,
                audio={"input": {"turn_detection": None}},
            )
            await say(conn, "Tell me a story.")
            await conn.response.create()
            text_turn = []
            await until(conn, "response.done", text_turn)
            await conn.conversation.item.delete(
                item_id=of(text_turn, "response.done")[0]["response"]["output"][0]["id"]
            )
            await conn.conversation.item.delete(item_id=of(text_turn, "conversation.item.added")[0]["item"]["id"])
            await append(conn, spoken)
            await conn.input_audio_buffer.commit()
            await conn.response.create(
                response={
                    "output_modalities": ["audio"],
                    "max_output_tokens": 6,
                    "audio": {"output": {"voice": "Aiden"}},
                }
            )
            spoken_turn = []
            await until(conn, "response.done", spoken_turn)
            return text_turn, spoken_turn

    text_turn, spoken_turn = run(go())
    ref = reference_generate(
        tiny_qwen3,
        chat_request([{"role": "user", "content": "Tell me a story."}], max_tokens=10, temperature=0, seed=3),
    )
    text = "".join(e["delta"] for e in of(text_turn, "response.output_text.delta"))
    assert text == ref.text and text
    assert of(text_turn, "response.done")[0]["response"]["usage"]["output_tokens"] == len(ref.token_ids)

    assert of(spoken_turn, "input_audio_buffer.committed")
    pcm = b"".join(base64.b64decode(e["delta"]) for e in of(spoken_turn, "response.output_audio.delta"))
    transcript = "".join(e["delta"] for e in of(spoken_turn, "response.output_audio_transcript.delta"))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=DEADLINE)
    wav = base64.b64encode(wav_header(len(spoken), 24000) + spoken).decode()
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=6,
        temperature=0,
        seed=3,
        modalities=["text", "audio"],
        extra_body={"sampling_params_list": [{}, {"max_tokens": 12}]},
        audio={"voice": "Aiden", "format": "pcm16"},
        messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}
        ],
    )
    assert pcm and pcm == base64.b64decode(r.choices[0].message.audio.data)
    assert transcript == r.choices[0].message.content
