"""Shared fixtures: the tiny checkpoint (loaded once) and real media made on the machine (espeak-ng, ffmpeg, PIL)."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one intra-op thread in the test processes and the processes they start (omni serve, omni demo, the CLIs): the tiny
# model's ops are too small for two OpenMP threads to pay, and on the 2-core machine, with make test's two workers,
# they run 10-20x slower contending (the pipeline sets the same on CPU: serve/pipeline.py)
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# how the suite is spread over make test's xdist workers (tests/ is on sys.path: this conftest's directory)
from scheduling import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: E402, F401

_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Every report is written by now (terminal summary, junit XML): leave without the interpreter's teardown. The
    crash this masks: once in a full run (448 passed, 2026-12-02) the process died with SIGSEGV there (make saw 139
    for a green run), in the finalizers of the worker threads, Ray driver connections and torch state that the
    session's modules leave behind; its cause is not found (no core dump was kept, and single modules exit 0 without
    this). Reproducer: tools/repro_teardown_segfault.py (runs test modules with OMNI_TEST_HARD_EXIT=0 and
    faulthandler on through the teardown, and prints the crashing thread's frames)."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller is the one process that leaves early
        return
    if "status" in _EXIT and os.environ.get("OMNI_TEST_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])


def _run(cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tiny():
    from omni.checkpoint import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_qwen3():
    """The tiny random Qwen3-Omni (MoE Thinker, Talker + code predictor, Code2Wav), loaded once."""
    from omni.checkpoint import load_model

    return load_model("tiny-qwen3")


@pytest.fixture(scope="session")
def pipeline_qwen3(tiny_qwen3):
    """The in-process pipeline over the shared tiny Qwen3-Omni: the same Pipeline class, Qwen3 stages."""
    from omni.serve.pipeline import Pipeline

    return Pipeline(tiny_qwen3)


@pytest.fixture(scope="session")
def pipeline(tiny):
    """The in-process pipeline over the shared tiny model (the HTTP tests' backend and the Serve app's oracle)."""
    from omni.serve.pipeline import Pipeline

    return Pipeline(tiny)


@pytest.fixture(scope="session")
def stop_codes(tiny) -> tuple[int, int]:
    """The Talker's stop codes (codec pad, codec end), from the model config."""
    talker = tiny.model.talker
    return talker.codec_pad_token, talker.codec_eos_token


@pytest.fixture(scope="session")
def media(media_dir) -> dict:
    """The sample media of media_dir, loaded as the API loads them: {"image", "audio", "video"}."""
    from omni.encoders.media import MediaPolicy, load_audio, load_image, load_video

    policy = MediaPolicy(allowed_local_media_path=str(media_dir))
    return {
        "image": load_image(str(media_dir / "image.png"), policy),
        "audio": load_audio(str(media_dir / "speech.wav"), policy),
        "video": load_video(str(media_dir / "clip.mp4"), policy),
    }


@pytest.fixture(scope="session")
def cookbook_media(media_dir) -> dict:
    """The same files as `media`, decoded as Qwen's cookbooks decode them (qwen-omni-utils' process_mm_info, through
    omni.reference_inputs): the golden oracle's inputs. The video carries its audio track."""
    from omni.reference_inputs import cookbook_request

    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(media_dir / "image.png")},
                {"type": "audio", "audio": str(media_dir / "speech.wav")},
                {"type": "video", "video": str(media_dir / "clip.mp4")},
            ],
        }
    ]
    image, audio, video = cookbook_request(conv, use_audio_in_video=True).messages[0].content
    return {"image": image.image, "audio": audio.audio, "video": video.video}


@pytest.fixture(scope="session")
def cookbook(media, cookbook_media):
    """request -> the same request for the golden oracle: each media item of `media` (our loaders) swapped for the
    cookbook's decoding of its file (`cookbook_media`). A media item from anywhere else is refused, so no golden runs
    on our loaders' output unawares."""
    import dataclasses

    from omni.types import AudioPart, ImagePart, Message, VideoPart

    swap = {id(media[k]): cookbook_media[k] for k in ("image", "audio", "video")}
    fields = {ImagePart: "image", AudioPart: "audio", VideoPart: "video"}

    def part(p):
        if type(p) not in fields:
            return p
        item = getattr(p, fields[type(p)])
        assert id(item) in swap, f"{type(p).__name__} not from the `media` fixture: no cookbook decoding to swap in"
        return type(p)(swap[id(item)])

    def convert(request):
        return dataclasses.replace(
            request,
            messages=[
                m if isinstance(m.content, str) else Message(m.role, [part(p) for p in m.content])
                for m in request.messages
            ],
        )

    return convert


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """speech.wav (espeak-ng, 16 kHz mono, ~3 s), clip.mp4 (ffmpeg test pattern 2 s, 8 fps, 112x112, AAC speech),
    image.png (PIL, 112x84)."""
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make setup` (it installs the Debian packages the tests need)")
    d = tmp_path_factory.mktemp("media")
    _run(["espeak-ng", "-w", str(d / "raw.wav"), "The quick brown fox jumps over the lazy dog. What do you hear?"])
    _run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(d / "raw.wav"),
            "-ac",
            "1",
            "-ar",
            "16000",
            str(d / "speech.wav"),
        ]
    )
    _run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=112x112:rate=8:duration=2",
            "-i",
            str(d / "speech.wav"),
            "-t",
            "2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
            str(d / "clip.mp4"),
        ]
    )
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (112, 84), (200, 60, 40))
    ImageDraw.Draw(im).ellipse((20, 10, 70, 60), fill=(30, 90, 220))
    im.save(d / "image.png")
    return d


@pytest.fixture(scope="session")
def speech(media_dir) -> np.ndarray:
    import soundfile as sf

    wav, sr = sf.read(media_dir / "speech.wav", dtype="float32")
    assert sr == 16000
    return wav
