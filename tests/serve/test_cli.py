"""The `omni` command as a user runs it: make-tiny, and chat on the bundled sample media (the README's run command)."""

import subprocess
import sys
import wave
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def omni(*args, timeout=600):
    """`omni ARGS` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "omni.serve.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def omni_here(*args):
    """`omni ARGS` through the same entry point (`main`) in this process: exit code, stdout and stderr as a process
    would give them, without a new interpreter importing torch each time (~15 s here per call)."""
    import contextlib
    import io

    from omni.serve.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors, sys.exit(code or message) in a command
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):  # what the interpreter prints for sys.exit("message")
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(["omni", *args], code, out.getvalue(), err.getvalue())


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path):
    out = omni_here("make-tiny", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert sorted(model.speaker_map) == ["Chelsie", "Ethan"]
    assert type(AutoProcessor.from_pretrained(tmp_path / "ckpt")).__name__ == "Qwen2_5OmniProcessor"


@pytest.mark.slow
def test_chat_streams_text_and_writes_speech(tmp_path, tiny):
    """`omni chat` with an image, audio and video prints the reply the reference path gives and writes a WAV."""
    from omni.reference import reference_generate
    from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart, VideoPart
    from omni.encoders.media import MediaPolicy, load_audio, load_image, load_video

    samples = REPO / "assets" / "samples"
    wav = tmp_path / "answer.wav"
    out = omni(
        "chat",
        "--image",
        str(samples / "image.png"),
        "--audio",
        str(samples / "speech.wav"),
        "--video",
        str(samples / "clip.mp4"),
        "--max-tokens",
        "12",
        "--max-speech-tokens",
        "60",
        "--speak",
        str(wav),
        "What do you see and hear?",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    policy = MediaPolicy(allowed_local_media_path=str(samples))
    req = ChatRequest(
        [
            Message(
                "user",
                [
                    ImagePart(load_image(str(samples / "image.png"), policy)),
                    AudioPart(load_audio(str(samples / "speech.wav"), policy)),
                    VideoPart(load_video(str(samples / "clip.mp4"), policy, with_audio=False)),
                    TextPart("What do you see and hear?"),
                ],
            )
        ],
        sampling=SamplingParams(max_tokens=12),
    )
    assert out.stdout.rstrip("\n") == reference_generate(tiny, req).text
    assert "12 tokens" in out.stderr and "wrote" in out.stderr
    with wave.open(str(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert 0 < w.getnframes() <= 60 * 480


def test_chat_reports_bad_input_clearly(tmp_path):
    missing = omni_here("chat", "--image", str(tmp_path / "nope.png"), "hi")
    assert missing.returncode != 0 and "no such file" in missing.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a PNG")
    out = omni_here("chat", "--image", str(bad), "hi")
    assert out.returncode == 2 and "omni chat:" in out.stderr and "Traceback" not in out.stderr
    voice = omni_here("chat", "--voice", "Nobody", "--speak", str(tmp_path / "x.wav"), "hi")
    assert voice.returncode == 2 and "Chelsie, Ethan" in voice.stderr


def test_chat_is_greedy_unless_temperature_or_seed():
    from omni.serve.cli import build_chat_request, parser

    def req(*flags):
        return build_chat_request(parser().parse_args(["chat", *flags, "hi"]))

    r = req()
    assert r.sampling.greedy and r.talker_sampling.greedy and r.messages[-1].role == "user"
    r = req("--seed", "3")
    assert r.sampling.temperature == 1.0 and r.sampling.seed == 3
    assert not r.talker_sampling.greedy and r.talker_sampling.seed == 3
    r = req("--temperature", "0.7", "--system", "Be brief.")
    assert r.sampling.temperature == 0.7 and r.messages[0].role == "system"


@pytest.mark.slow
def test_speak_writes_the_speech_endpoints_audio(tmp_path, pipeline):
    """`omni speak TEXT --out F.flac` writes exactly the speech the pipeline gives for the forced reply."""
    import asyncio

    import av
    import numpy as np

    from omni.serve.api.convert import ConvertOptions, to_speech_request
    from omni.serve.api.protocol import SpeechRequest

    out = omni_here(
        "speak",
        "Hello from omni.",
        "--voice",
        "Ethan",
        "--out",
        str(tmp_path / "hello.flac"),
        "--max-speech-tokens",
        "40",
    )
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stderr and "voice Ethan" in out.stderr
    with av.open(str(tmp_path / "hello.flac")) as c:
        got = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    req = to_speech_request(
        SpeechRequest(
            input="Hello from omni.",
            voice="Ethan",
            response_format="flac",
            sampling_params_list=[None, {"max_tokens": 40, "temperature": 0.0}],
        ),
        "t",
        ConvertOptions(voices=tuple(pipeline.voices), default_speech_tokens=40),
    )
    want = asyncio.run(pipeline.run(req)).waveform
    assert np.array_equal(got, np.rint(np.clip(want, -1, 1) * 32767).astype(np.int16))
    bad = omni_here("speak", "x", "--out", str(tmp_path / "a.xyz"))
    assert bad.returncode == 2 and "unsupported output a.xyz" in bad.stderr
