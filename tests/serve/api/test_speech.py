"""POST /v1/audio/speech and the audio formats, through the official SDK against the real HTTP app over the
in-process pipeline (tiny checkpoint): the codes equal the official Talker fed the official Thinker's hidden states
for the same forced reply (its ids from the tokenizer), the speech is within MIN_STREAM_SNR_DB of the offline decode
of those codes; every format decodes back to the same speech (lossless: the samples; lossy: correlation at the
codec's delay); streaming, SSE, errors, voices, metrics."""

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
from omni.decoders import MIN_STREAM_SNR_DB, snr_db
from omni.serve.api.audio_io import AUDIO_FORMATS, AudioStreamEncoder, encode_audio, pcm16_bytes
from omni.serve.api.convert import ConvertOptions, to_speech_request
from omni.serve.api.local_server import LocalServer
from omni.serve.api.protocol import SpeechRequest
from omni.serve.api.server import ServerSettings, build_fastapi

KEY = "sk-speech"
TEXT = "Hello there, how are you today?"
GREEDY = {"sampling_params_list": [None, {"temperature": 0.0, "max_tokens": 60}]}  # a greedy, bounded Talker


@pytest.fixture(scope="module")
def server(pipeline):
    settings = ServerSettings(served_model_name="omni-tts", api_key=KEY, default_speech_tokens=60)
    with LocalServer(build_fastapi(pipeline, settings)) as s:
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


def forced_reply_ids(tokenizer, text: str) -> list[int]:
    """The reply the speech endpoint must force, from the tokenizer itself (not from the code under test): the text's
    tokens, then the end of turn."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_speech_codes_equal_the_official_talker_on_the_forced_reply(server, client, pipeline, tiny, stop_codes):
    wav = client.audio.speech.create(
        model="omni-tts", voice="Ethan", input=TEXT, response_format="wav", extra_body=GREEDY
    ).content
    req = to_speech_request(
        SpeechRequest(input=TEXT, voice="Ethan", response_format="wav", **GREEDY),
        "oracle",
        ConvertOptions(voices=tuple(pipeline.voices), default_speech_tokens=60),
    )
    ours = asyncio.run(pipeline.run(req))
    reply = forced_reply_ids(tiny.processor.tokenizer, TEXT)
    assert pipeline.thinker.reply_ids(TEXT) == reply
    ref = reference_generate(tiny, req, forced_reply_ids=reply)  # tests/omni/test_reference_forced.py validates it
    assert ours.text == TEXT and ours.token_ids == ref.token_ids == reply  # the reply is the input, verbatim
    assert ours.codec_ids == ref.codec_ids and len(ours.codec_ids) > 12
    assert wav[44:] == pcm16_bytes(ours.waveform)  # the endpoint's speech is that pipeline run's
    # the speech: the streamed vocoder against the whole-utterance decode of the same codes (the official token2wav
    # within 1e-4, tests/serve/test_pipeline.py), the bound of every streamed output. Measured: 71.2 dB.
    codes = [c for c in ours.codec_ids if c not in stop_codes]
    offline = pipeline.vocoder.offline(codes, "Ethan", seed=0)
    assert len(ours.waveform) == len(ref.waveform) == len(offline) == 480 * len(codes)
    assert float(np.abs(offline - ref.waveform).max()) <= 1e-4
    assert snr_db(offline, ours.waveform) >= MIN_STREAM_SNR_DB
    # what the client gets (PCM16 of it) as well: 16-bit rounding costs little here (the
    # utterance's rms is 0.27). Measured: 71.1 dB.
    endpoint = np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32767
    assert snr_db(offline, endpoint) >= MIN_STREAM_SNR_DB


@pytest.fixture(scope="module")
def chelsie_pcm(server) -> np.ndarray:
    r = httpx.post(
        f"{server.url}/v1/audio/speech",
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"input": TEXT, "voice": "Chelsie", "response_format": "pcm", **GREEDY},
    )
    return np.frombuffer(r.content, "<i2").astype(np.float32) / 32767


MAX_CODEC_DELAY = 4096  # samples at 24 kHz searched for the codec delay (measured: mp3 576, aac 1024, opus 0)
# Correlation of each lossy decode with the lossless speech at its delay, on this test's utterance (Chelsie, tiny):
# measured mp3 0.759 (delay 576), opus 0.994 (delay 0, 48 kHz resampled to 24), aac 0.858 (delay 1024), with
# libmp3lame / libopus / FFmpeg's aac through PyAV. Bound = measured - 0.02 (other codec builds move it a little).
# A stream 1 ms off its delay measured 0.25-0.42, 10 ms off 0.69-0.83: a misaligned, truncated or wrong-rate
# stream fails.
LOSSY_MIN_CORRELATION = {"mp3": 0.74, "opus": 0.97, "aac": 0.84}


def _to_24k(x: np.ndarray, rate: int) -> np.ndarray:
    import librosa

    return librosa.resample(x, orig_sr=rate, target_sr=24000).astype(np.float32)


def aligned_correlation(ref: np.ndarray, got: np.ndarray, max_lag: int = MAX_CODEC_DELAY) -> tuple[int, float]:
    """The codec's delay (the shift of `got` in [0, max_lag] with the largest cross-correlation with `ref`) and the
    Pearson correlation of the two at that shift, over the whole of `ref` that `got` covers."""
    n = min(len(ref), len(got) - max_lag)
    assert n > len(ref) // 2, (len(ref), len(got))
    xc = np.correlate(got[: n + max_lag].astype(np.float64), ref[:n].astype(np.float64), mode="valid")  # [max_lag+1]
    lag = int(np.argmax(xc))
    m = min(len(ref), len(got) - lag)
    return lag, float(np.corrcoef(got[lag : lag + m], ref[:m])[0, 1])


@pytest.mark.parametrize("fmt", list(AUDIO_FORMATS))
def test_every_format_decodes_back_to_the_speech(server, fmt, chelsie_pcm):
    r = httpx.post(
        f"{server.url}/v1/audio/speech",
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"input": TEXT, "voice": "Chelsie", "response_format": fmt, **GREEDY},
    )
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
        assert np.array_equal(np.rint(got[: len(pcm)] * 32767), np.rint(pcm * 32767))
    else:  # lossy: the lossless speech, shifted by the codec's delay
        lag, corr = aligned_correlation(pcm, got if rate == 24000 else _to_24k(got, rate))
        assert corr >= LOSSY_MIN_CORRELATION[fmt], (fmt, lag, corr)


def test_encoders_stream_and_round_trip(media_dir):
    """Formats on real speech (espeak-ng): every chunk of the stream is out before the end, and lossless ones
    decode to the very samples; lossy ones align with the input (correlation at the codec's delay)."""
    import librosa

    speech = librosa.resample(decode((media_dir / "speech.wav").read_bytes())[0], orig_sr=16000, target_sr=24000)
    for fmt in AUDIO_FORMATS:
        enc, parts = AudioStreamEncoder(fmt), []
        for i in range(0, len(speech), 2400):  # 100 ms chunks, as the vocoder hands them out
            parts.append(enc.feed(speech[i : i + 2400]))
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
            assert np.array_equal(np.rint(got[: len(speech)] * 32767), np.frombuffer(pcm16_bytes(speech), "<i2"))
            continue
        n = min(len(got), len(speech)) - 4096
        corr = max(float(np.corrcoef(got[lag : lag + n], speech[:n])[0, 1]) for lag in range(0, 4096, 8))
        assert corr > 0.9, (fmt, corr)


def test_streamed_speech_is_the_same_bytes_in_chunks(client):
    whole = client.audio.speech.create(
        model="omni-tts", voice="Chelsie", input=TEXT, response_format="pcm", extra_body=GREEDY
    ).content
    with client.audio.speech.with_streaming_response.create(
        model="omni-tts", voice="Chelsie", input=TEXT, response_format="pcm", extra_body=GREEDY
    ) as r:
        chunks = [c for c in r.iter_bytes(1024)]
    assert b"".join(chunks) == whole and len(chunks) > 1


def test_sse_stream_format(server):
    body = {"input": TEXT, "voice": "Ethan", "response_format": "pcm", "stream_format": "sse", **GREEDY}
    with httpx.stream(
        "POST", f"{server.url}/v1/audio/speech", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    plain = httpx.post(
        f"{server.url}/v1/audio/speech",
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
        json={**body, "stream_format": "audio"},
    ).content
    assert pcm == plain


@pytest.mark.parametrize(
    "body, status, param, match",
    [
        ({"input": TEXT, "voice": "alloy"}, 400, "audio.voice", "unknown voice 'alloy'; valid voices: Chelsie, Ethan"),
        ({"input": "x" * 4097}, 400, "input", "at most 4096 characters"),
        ({"input": "   "}, 400, "input", "input must contain text"),
        ({"input": TEXT, "speed": 2.0}, 400, "speed", "speed=2.0 is not supported"),
        ({"input": TEXT, "response_format": "ogg"}, 400, "response_format", "response_format"),
        ({"input": TEXT, "model": "tts-1"}, 404, "model", "does not exist"),
    ],
)
def test_speech_errors_are_openai_errors(server, body, status, param, match):
    r = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


def test_voices_models_chat_formats_and_metrics(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/v1/audio/voices", headers=h).json() == {
        "object": "list",
        "model": "omni-tts",
        "voices": ["Chelsie", "Ethan"],
    }
    card = httpx.get(f"{server.url}/v1/models", headers=h).json()["data"][0]
    assert card["speaks"] is True and card["voices"] == ["Chelsie", "Ethan"]
    # chat audio in another format, with vllm-omni's `speaker` for the voice
    r = client.chat.completions.create(
        model="omni-tts",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=6,
        modalities=["text", "audio"],
        audio={"format": "flac"},
        extra_body={"speaker": "Ethan", **GREEDY},
    )
    flac, rate = decode(base64.b64decode(r.choices[0].message.audio.data))
    wav = client.chat.completions.create(
        model="omni-tts",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=6,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        extra_body=GREEDY,
    )
    assert np.array_equal(flac, decode(base64.b64decode(wav.choices[0].message.audio.data))[0])
    metrics = httpx.get(f"{server.url}/metrics", headers=h).text
    assert "omni_speech_time_to_first_audio_seconds_count" in metrics
    count = [line for line in metrics.splitlines() if line.startswith("omni_speech_time_to_first_audio_seconds_count")]
    assert float(count[0].split()[-1]) >= 1
