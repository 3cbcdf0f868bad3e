"""The OpenAI wire format without a server: request parsing, conversion to ChatRequest (real media through
omni.encoders.media), sampling resolution, response / chunk building from real events, PCM16 / WAV bytes."""

import base64
import dataclasses
import io
import json
import wave

import numpy as np
import pytest
from pydantic import ValidationError

from omni.types import (
    TALKER_DEFAULT_SAMPLING,
    AudioChunk,
    AudioPart,
    Finished,
    ImagePart,
    InvalidRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    VideoPart,
)
from omni.serve.api.audio_io import pcm16_bytes, wav_bytes
from omni.serve.api.convert import Completion, ConvertOptions, resolve_sampling, to_chat_request
from omni.serve.api.protocol import ChatCompletionChunk, ChatCompletionRequest


def req(**kw) -> ChatCompletionRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def data_uri(path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


# ---------------------------------------------------------------------------------------------------- parsing
def test_unknown_fields_are_ignored_and_modalities_null_is_text():
    r = req(
        modalities=None,
        frequency_penalty=0.5,
        logit_bias={},
        user="u",
        parallel_tool_calls=False,
        stream_options={"include_usage": True, "something_new": 1},
    )
    assert r.speak is False and r.stream_options.include_usage
    assert req(modalities=["text", "audio"]).speak is True
    assert req().speak is False


def test_content_parts_parse_and_unsupported_type_is_named():
    r = req(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},  # a bare string url is accepted
                    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA", "num_frames": 4}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}},
                ],
            }
        ]
    )
    parts = r.messages[0].content
    assert [p.type for p in parts] == ["text", "image_url", "video_url", "input_audio", "audio_url"]
    assert parts[1].image_url.url.startswith("data:image/png") and parts[2].video_url.num_frames == 4
    with pytest.raises(ValidationError, match="unsupported content part type 'file' in content\\[1\\]"):
        req(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "file", "file": {}}]}])
    with pytest.raises(ValidationError, match="n=2 is not supported"):
        req(n=2)


# ---------------------------------------------------------------------------------------------------- sampling
def test_sampling_top_level_then_sampling_params_list():
    opts = ConvertOptions(max_tokens_limit=1000, default_max_tokens=77)
    thinker, talker, voc = resolve_sampling(req(), opts)
    assert thinker.max_tokens == 77 and thinker.greedy and thinker.seed is None
    assert talker == dataclasses.replace(TALKER_DEFAULT_SAMPLING, max_tokens=opts.default_speech_tokens) and voc is None
    assert resolve_sampling(req(), ConvertOptions(default_speech_tokens=99))[1].max_tokens == 99

    r = req(
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        seed=5,
        max_tokens=10,
        max_completion_tokens=12,
        repetition_penalty=1.1,
        stop_token_ids=[7],
        sampling_params_list=[
            {"temperature": 0.0, "max_tokens": 20, "detokenize": True},
            {"top_k": 10, "max_tokens": 48, "stop_token_ids": [8292]},
            {"seed": 99},
        ],
    )
    thinker, talker, voc = resolve_sampling(r, opts)
    # list[0] wins field by field; the rest is the top level (max_completion_tokens over max_tokens)
    got = (thinker.temperature, thinker.top_p, thinker.top_k, thinker.max_tokens, thinker.seed)
    assert got == (0.0, 0.9, -1, 20, 5)
    assert thinker.repetition_penalty == 1.1 and thinker.stop_token_ids == (7,)
    # the talker keeps its defaults except what list[1] sets, and inherits the request's seed
    assert (talker.temperature, talker.top_k, talker.top_p, talker.max_tokens) == (0.9, 10, 0.8, 48)
    assert talker.seed == 5 and talker.stop_token_ids == (8292,) and voc == 99
    assert resolve_sampling(req(max_tokens=10), opts)[0].max_tokens == 10
    # the default never exceeds the server's limit
    assert resolve_sampling(req(), ConvertOptions(max_tokens_limit=50, default_max_tokens=256))[0].max_tokens == 50


@pytest.mark.parametrize(
    "kw, param, message",
    [
        ({"max_tokens": 1001}, "max_tokens", "max_tokens=1001 is more than this server allows \\(1000\\)"),
        ({"sampling_params_list": [{"max_tokens": 5000}]}, "max_tokens", "max_tokens=5000"),
    ],
)
def test_sampling_past_the_server_limit_is_invalid_request(kw, param, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        resolve_sampling(req(**kw), ConvertOptions(max_tokens_limit=1000))
    assert e.value.param == param


@pytest.mark.parametrize(
    "kw, loc",
    [
        ({"temperature": -1}, ("temperature",)),
        ({"temperature": float("nan")}, ("temperature",)),
        ({"temperature": float("inf")}, ("temperature",)),
        ({"top_p": 0}, ("top_p",)),
        ({"top_p": 1.5}, ("top_p",)),
        ({"max_tokens": 0}, ("max_tokens",)),
        ({"max_completion_tokens": -3}, ("max_completion_tokens",)),
        ({"repetition_penalty": 0}, ("repetition_penalty",)),
        ({"seed": 2**70}, ("seed",)),
        ({"top_k": -5}, ("top_k",)),
        ({"stop_token_ids": [-1]}, ("stop_token_ids", 0)),
        ({"stop": ["x"] * 17}, ("stop", "list[str]")),
        ({"sampling_params_list": [None, {"top_k": -5}]}, ("sampling_params_list", 1, "top_k")),
        ({"sampling_params_list": [None, {"temperature": float("nan")}]}, ("sampling_params_list", 1, "temperature")),
        ({"sampling_params_list": [{}, {}, {}, {}]}, ("sampling_params_list",)),
        ({"mm_processor_kwargs": {"use_audio_in_video": "maybe"}}, ("mm_processor_kwargs", "use_audio_in_video")),
    ],
)
def test_bad_sampling_is_refused_at_the_edge_naming_the_field(kw, loc):
    """Every sampling field is range-checked and finite before any stage sees it."""
    with pytest.raises(ValidationError) as e:
        req(**kw)
    assert loc in [err["loc"][: len(loc)] for err in e.value.errors()]


def test_sampling_params_refuse_non_finite_values_in_process_too():
    for f in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(InvalidRequest, match=f"{f} must be a finite number"):
            SamplingParams(**{f: float("nan")}).validate()


# ---------------------------------------------------------------------------------------------------- media
def test_media_parts_become_decoded_media(media_dir, speech):
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_uri(media_dir / "image.png", "image/png")}},
        {"type": "audio_url", "audio_url": {"url": data_uri(media_dir / "speech.wav", "audio/wav")}},
        {
            "type": "input_audio",
            "input_audio": {
                "data": base64.b64encode((media_dir / "speech.wav").read_bytes()).decode(),
                "format": "wav",
            },
        },
        {"type": "video_url", "video_url": {"url": data_uri(media_dir / "clip.mp4", "video/mp4"), "num_frames": 4}},
    ]
    r = req(
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": content}],
        modalities=["text", "audio"],
        audio={"voice": "ethan", "format": "wav"},
        mm_processor_kwargs={"use_audio_in_video": True},
    )
    chat = to_chat_request(r, "rid1", ConvertOptions(voices=("Chelsie", "Ethan")))
    assert chat.request_id == "rid1" and chat.speak and chat.use_audio_in_video and chat.voice == "Ethan"
    assert chat.messages[0].role == "system" and chat.messages[0].content == "Be brief."
    text, image, audio, audio2, video = chat.messages[1].content
    assert isinstance(text, TextPart) and text.text == "What is this?"
    assert isinstance(image, ImagePart) and image.image.size == (112, 84) and image.image.mode == "RGB"
    assert isinstance(audio, AudioPart) and np.array_equal(audio.audio, audio2.audio)
    np.testing.assert_allclose(audio.audio, speech, atol=1e-4)  # the same 16 kHz samples the file holds
    assert isinstance(video, VideoPart) and video.video.frames.shape[0] == 4 and video.video.audio is not None


def test_default_voice_and_unknown_voice_passes_through():
    assert to_chat_request(req(modalities=["text", "audio"]), "r").voice == "Chelsie"
    chat = to_chat_request(
        req(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}),
        "r",
        ConvertOptions(voices=("Chelsie", "Ethan")),
    )
    assert chat.voice == "alloy"  # the backend rejects it, listing the valid voices


@pytest.mark.parametrize(
    "part, status, match",
    [
        (
            {"type": "input_audio", "input_audio": {"data": "not base64 !!", "format": "wav"}},
            400,
            "messages\\[0\\].content\\[0\\].input_audio.data is not valid base64",
        ),
        (
            {
                "type": "video_url",
                "video_url": {
                    "url": "data:video/mp4;base64,"
                    + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50).decode()
                },
            },
            400,
            "messages\\[0\\].content\\[0\\]: .*video",
        ),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, 400, "local media paths are disabled"),
        (
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}},
            400,
            "http\\(s\\) media URLs are disabled",
        ),
    ],
)
def test_bad_media_is_a_client_error(part, status, match):
    with pytest.raises(InvalidRequest, match=match) as e:
        to_chat_request(req(messages=[{"role": "user", "content": [part]}]), "r")
    assert getattr(e.value, "status_code", 400) == status
    assert e.value.param.startswith("messages[0].content[0]")


def test_unsupported_audio_format_is_rejected_only_when_speaking():
    with pytest.raises(InvalidRequest, match="unsupported audio format 'ogg'; supported: wav, pcm16, pcm, mp3, opus"):
        to_chat_request(req(modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "ogg"}), "r")
    assert to_chat_request(req(audio={"voice": "Chelsie", "format": "ogg"}), "r").speak is False
    assert to_chat_request(req(modalities=["text", "audio"], audio={"format": "mp3"}), "r").speak is True


# ---------------------------------------------------------------------------------------------------- bytes
def test_pcm16_clips_and_rounds():
    pcm = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, 1 / 32767 * 0.49, 1 / 32767 * 0.51, np.nan], np.float32)
    got = np.frombuffer(pcm16_bytes(pcm), "<i2").tolist()
    assert got == [0, 32767, -32767, 32767, -32767, 16384, 0, 1, 0]


def test_wav_bytes_is_a_24khz_mono_16bit_wav():
    pcm = np.sin(np.linspace(0, 100, 2400)).astype(np.float32) * 0.5
    raw = wav_bytes(pcm)
    with wave.open(io.BytesIO(raw)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24000, 1, 2, 2400)
        assert w.readframes(2400) == pcm16_bytes(pcm)
    assert len(raw) == 44 + 4800


# ---------------------------------------------------------------------------------------------------- responses
def _events():
    a, b = np.full(480, 0.25, np.float32), np.full(960, -0.5, np.float32)
    return [
        TextDelta("Hel", [1]),
        TextDelta("lo", [2]),
        AudioChunk(a),
        TextDelta(" you", [3]),
        AudioChunk(b),
        Finished("stop", prompt_tokens=11, completion_tokens=4, codec_tokens=3),
    ], np.concatenate([a, b])


def test_non_streaming_response_carries_text_wav_and_usage():
    events, pcm = _events()
    comp = Completion("abc", "tiny", speak=True, audio_format="wav")
    for ev in events:
        comp.feed(ev)
    r = comp.response().model_dump()
    msg = r["choices"][0]["message"]
    assert r["id"] == "chatcmpl-abc" and r["object"] == "chat.completion" and r["model"] == "tiny"
    assert msg["content"] == "Hello you" and msg["audio"]["transcript"] == "Hello you"
    assert msg["audio"]["id"] == "audio_abc" and msg["audio"]["expires_at"] > r["created"]
    assert base64.b64decode(msg["audio"]["data"]) == wav_bytes(pcm)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}

    comp = Completion("abc", "tiny", speak=True, audio_format="pcm16")
    for ev in events:
        comp.feed(ev)
    assert base64.b64decode(comp.response().choices[0].message.audio.data) == pcm16_bytes(pcm)


def test_stream_chunks_interleave_text_and_audio_then_finish_and_usage():
    events, pcm = _events()
    comp = Completion("abc", "tiny", speak=True, include_usage=True)
    chunks = [comp.role_chunk()] + [c for ev in events for c in comp.feed(ev)] + comp.final_chunks()
    wire = [json.loads(c.model_dump_json()) for c in chunks]
    deltas = [w["choices"][0]["delta"] if w["choices"] else None for w in wire]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [("text", d["content"]) if "content" in d else ("audio", len(d["audio"]["data"])) for d in deltas[1:6]] == [
        ("text", "Hel"),
        ("text", "lo"),
        ("audio", len(base64.b64encode(b"x" * 960))),
        ("text", " you"),
        ("audio", len(base64.b64encode(b"x" * 1920))),
    ]
    audio = b"".join(base64.b64decode(d["audio"]["data"]) for d in deltas[1:6] if "audio" in d)
    assert audio == pcm16_bytes(pcm) and deltas[3]["audio"]["id"] == "audio_abc"
    assert deltas[6] == {} and wire[6]["choices"][0]["finish_reason"] == "stop"
    assert wire[7]["choices"] == [] and wire[7]["usage"]["total_tokens"] == 15
    assert all(w["object"] == "chat.completion.chunk" and w["id"] == "chatcmpl-abc" for w in wire)
    ChatCompletionChunk.model_validate(wire[3])  # round-trips


def test_stop_strings_cut_the_text_even_across_deltas():
    comp = Completion("s", "tiny", stop=["END", "xyz"])
    sent = []
    for t in ["Hello E", "N", "D more"]:
        sent += [c.choices[0].delta.content for c in comp.feed(TextDelta(t, [0]))]
    assert sent == ["Hello "] and comp.done and comp.finish_reason == "stop"
    assert comp.response().choices[0].message.content == "Hello "
    # a held prefix that turns out not to be a stop string is released
    comp = Completion("s", "tiny", stop=["END"])
    out = [c.choices[0].delta.content for t in ["a E", "N", "x"] for c in comp.feed(TextDelta(t, [0]))]
    out += [c.choices[0].delta.content for c in comp.feed(Finished("length", 1, 3))]
    assert "".join(out) == "a ENx" and comp.finish_reason == "length"


def test_stream_without_finished_is_an_error():
    comp = Completion("x", "tiny")
    comp.feed(TextDelta("a", [1]))
    with pytest.raises(RuntimeError, match="without a Finished event"):
        comp.final_chunks()


def test_thinker_defaults_come_from_the_server_options():
    from omni.types import SamplingParams
    from omni.serve.api.convert import ConvertOptions, resolve_sampling
    from omni.serve.api.protocol import ChatCompletionRequest

    opts = ConvertOptions(default_sampling=SamplingParams(temperature=0.7, top_k=20), default_max_tokens=30)
    r = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    thinker = resolve_sampling(r, opts)[0]
    assert (thinker.temperature, thinker.top_k, thinker.max_tokens) == (0.7, 20, 30)
    r = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.0)
    assert resolve_sampling(r, opts)[0].greedy  # the request wins
