"""POST /v1/audio/speech and the audio formats, through the official SDK against the real HTTP app over the
in-process pipeline (tiny checkpoint): the codes equal the official Talker fed the official Thinker's hidden states
for the same forced reply; every format decodes back to the same speech; streaming, SSE, errors, voices, metrics."""
import asyncio
import base64
import io
import json

import av
import httpx
import numpy as np
import openai
import pytest

from omni.reference import reference_generate
from omni.serve.api.audio_io import AUDIO_FORMATS, AudioStreamEncoder, encode_audio, pcm16_bytes
from omni.serve.api.convert import ConvertOptions, to_speech_request
from omni.serve.api.protocol import SpeechRequest
from omni.serve.api.server import ServerSettings, build_fastapi

from .uvicorn_server import Server

KEY = "sk-speech"
TEXT = "Hello there, how are you today?"
GREEDY = {"sampling_params_list": [None, {"temperature": 0.0, "max_tokens": 60}]}  # a greedy, bounded Talker


@pytest.fixture(scope="module")
def server(pipeline):
    settings = ServerSettings(served_model_name="omni-tts", api_key=KEY, default_speech_tokens=60)
    with Server(build_fastapi(pipeline, settings)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any container -> (mono float32 samples, rate), through PyAV (FFmpeg)."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        frames = [f.to_ndarray() for f in c.decode(s)]
    x = np.concatenate([f.reshape(-1) if f.ndim == 1 or f.shape[0] == 1 else f.mean(0) for f in frames])
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32767
    return x.astype(np.float32), s.rate


def test_speech_codes_equal_the_official_talker_on_the_forced_reply(server, client, pipeline, tiny):
    wav = client.audio.speech.create(model="omni-tts", voice="Ethan", input=TEXT, response_format="wav",
                                     extra_body=GREEDY).content
    req = to_speech_request(SpeechRequest(input=TEXT, voice="Ethan", response_format="wav", **GREEDY), "oracle",
                            ConvertOptions(voices=tuple(pipeline.voices), default_speech_tokens=60))
    ours = asyncio.run(pipeline.run(req))
    ref = reference_generate(tiny, req, forced_reply_ids=pipeline.thinker.reply_ids(TEXT))
    assert ours.text == TEXT and ours.token_ids == ref.token_ids  # the reply is the input, verbatim
    assert ours.codec_ids == ref.codec_ids and len(ours.codec_ids) > 12
    assert wav[44:] == pcm16_bytes(ours.waveform)  # the endpoint's speech is that pipeline run's
    assert float(np.abs(ours.waveform[:len(ref.waveform)] - ref.waveform[:len(ours.waveform)]).max()) < 0.05


@pytest.fixture(scope="module")
def chelsie_pcm(server) -> np.ndarray:
    r = httpx.post(f"{server.url}/v1/audio/speech", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                   json={"input": TEXT, "voice": "Chelsie", "response_format": "pcm", **GREEDY})
    return np.frombuffer(r.content, "<i2").astype(np.float32) / 32767


@pytest.mark.parametrize("fmt", list(AUDIO_FORMATS))
def test_every_format_decodes_back_to_the_speech(server, fmt, chelsie_pcm):
    r = httpx.post(f"{server.url}/v1/audio/speech", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                   json={"input": TEXT, "voice": "Chelsie", "response_format": fmt, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == AUDIO_FORMATS[fmt][0]
    pcm = chelsie_pcm
    if fmt == "pcm":
        got, rate = np.frombuffer(r.content, "<i2").astype(np.float32) / 32767, 24000
    else:
        got, rate = decode(r.content)
    assert rate in (24000, 48000)  # Opus decodes at 48 kHz
    assert abs(len(got) / rate - len(pcm) / 24000) < 0.1  # same duration (lossy codecs pad a frame)
    if fmt in ("wav", "pcm", "flac"):  # lossless: the same samples
        assert np.array_equal(np.rint(got[:len(pcm)] * 32767), np.rint(pcm * 32767))
    else:  # lossy: the same loudness
        ref_rms, got_rms = float(np.sqrt((pcm ** 2).mean())), float(np.sqrt((got ** 2).mean()))
        assert 0.5 < got_rms / ref_rms < 1.5, (ref_rms, got_rms)


def test_encoders_stream_and_round_trip(media_dir):
    """Formats on real speech (espeak-ng): every chunk of the stream is out before the end, and lossless ones
    decode to the very samples; lossy ones align with the input (correlation at the codec's delay)."""
    import librosa

    speech = librosa.resample(decode((media_dir / "speech.wav").read_bytes())[0], orig_sr=16000, target_sr=24000)
    for fmt in AUDIO_FORMATS:
        enc, parts = AudioStreamEncoder(fmt), []
        for i in range(0, len(speech), 2400):  # 100 ms chunks, as the vocoder hands them out
            parts.append(enc.feed(speech[i:i + 2400]))
        parts.append(enc.close())
        data = b"".join(parts)
        assert sum(1 for p in parts[:-1] if p) >= len(parts) // 2, fmt  # bytes flow while it is being fed
        if fmt == "pcm":
            assert data == pcm16_bytes(speech)
            continue
        assert len(encode_audio(speech, fmt)) == pytest.approx(len(data), rel=0.05)  # whole == streamed
        got, rate = decode(data)
        if rate != 24000:
            got = librosa.resample(got, orig_sr=rate, target_sr=24000)
        if fmt in ("wav", "flac"):
            assert np.array_equal(np.rint(got[:len(speech)] * 32767), np.frombuffer(pcm16_bytes(speech), "<i2"))
            continue
        n = min(len(got), len(speech)) - 4096
        corr = max(float(np.corrcoef(got[lag:lag + n], speech[:n])[0, 1]) for lag in range(0, 4096, 8))
        assert corr > 0.9, (fmt, corr)


def test_streamed_speech_is_the_same_bytes_in_chunks(client):
    whole = client.audio.speech.create(model="omni-tts", voice="Chelsie", input=TEXT, response_format="pcm",
                                       extra_body=GREEDY).content
    with client.audio.speech.with_streaming_response.create(model="omni-tts", voice="Chelsie", input=TEXT,
                                                            response_format="pcm", extra_body=GREEDY) as r:
        chunks = [c for c in r.iter_bytes(1024)]
    assert b"".join(chunks) == whole and len(chunks) > 1


def test_sse_stream_format(server):
    body = {"input": TEXT, "voice": "Ethan", "response_format": "pcm", "stream_format": "sse", **GREEDY}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    plain = httpx.post(f"{server.url}/v1/audio/speech", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                       json={**body, "stream_format": "audio"}).content
    assert pcm == plain


@pytest.mark.parametrize("body, status, param, match", [
    ({"input": TEXT, "voice": "alloy"}, 400, "audio.voice", "unknown voice 'alloy'; valid voices: Chelsie, Ethan"),
    ({"input": "x" * 4097}, 400, "input", "at most 4096 characters"),
    ({"input": "   "}, 400, "input", "input must contain text"),
    ({"input": TEXT, "speed": 2.0}, 400, "speed", "speed=2.0 is not supported"),
    ({"input": TEXT, "response_format": "ogg"}, 400, "response_format", "response_format"),
    ({"input": TEXT, "model": "tts-1"}, 404, "model", "does not exist"),
])
def test_speech_errors_are_openai_errors(server, body, status, param, match):
    r = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


def test_voices_models_chat_formats_and_metrics(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/v1/audio/voices", headers=h).json() == {"object": "list", "model": "omni-tts",
                                                                           "voices": ["Chelsie", "Ethan"]}
    card = httpx.get(f"{server.url}/v1/models", headers=h).json()["data"][0]
    assert card["speaks"] is True and card["voices"] == ["Chelsie", "Ethan"]
    # chat audio in another format, with vllm-omni's `speaker` for the voice
    r = client.chat.completions.create(model="omni-tts", messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=6, modalities=["text", "audio"], audio={"format": "flac"},
                                       extra_body={"speaker": "Ethan", **GREEDY})
    flac, rate = decode(base64.b64decode(r.choices[0].message.audio.data))
    wav = client.chat.completions.create(model="omni-tts", messages=[{"role": "user", "content": "Say hi."}],
                                         max_tokens=6, modalities=["text", "audio"], audio={"voice": "Ethan",
                                                                                            "format": "wav"},
                                         extra_body=GREEDY)
    assert np.array_equal(flac, decode(base64.b64decode(wav.choices[0].message.audio.data))[0])
    metrics = httpx.get(f"{server.url}/metrics", headers=h).text
    assert "omni_speech_time_to_first_audio_seconds_count" in metrics
    count = [line for line in metrics.splitlines() if line.startswith("omni_speech_time_to_first_audio_seconds_count")]
    assert float(count[0].split()[-1]) >= 1
