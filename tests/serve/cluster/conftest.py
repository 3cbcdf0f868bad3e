"""Fixtures of the `omni caption` tests: a mixed folder of real media (good and bad files) and the oracle, the official
transformers `generate` on the request `omni chat --KIND F PROMPT` builds."""
import shutil
from pathlib import Path

import pytest

# name -> (media type, ok); made from the session's real media (tests/conftest.py)
MIXED = {
    "image.png": ("image", True),
    "speech.wav": ("audio", True),
    "clip.mp4": ("video", True),
    "sub/drawing.jpg": ("image", True),
    "sub/voice.bin": ("audio", True),  # a WAV under a name that says nothing: sniffed from the bytes
    "corrupt.png": ("image", False),  # PNG signature, garbage after it
    "truncated.mp4": ("video", False),  # the first half of clip.mp4
    "empty.wav": (None, False),
    "notes.txt": (None, False),
}


@pytest.fixture(scope="session")
def mixed_dir(media_dir, tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("mixed")
    (d / "sub").mkdir()
    for name in ("image.png", "speech.wav", "clip.mp4"):
        shutil.copy(media_dir / name, d / name)
    im = Image.new("RGB", (96, 128), (20, 160, 90))
    ImageDraw.Draw(im).rectangle((10, 30, 80, 100), fill=(240, 240, 30))
    im.save(d / "sub" / "drawing.jpg", quality=90)
    shutil.copy(media_dir / "speech.wav", d / "sub" / "voice.bin")
    png = (media_dir / "image.png").read_bytes()
    (d / "corrupt.png").write_bytes(png[:33] + bytes(range(256)) * 2)
    mp4 = (media_dir / "clip.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (d / "empty.wav").write_bytes(b"")
    (d / "notes.txt").write_text("not media\n")
    (d / ".hidden.png").write_bytes(png)  # skipped: hidden
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")) == \
        sorted(MIXED)
    return d


@pytest.fixture(scope="session")
def oracle(tiny):
    """oracle(path, kind, prompt, max_tokens, use_audio_in_video=False) -> ReferenceResult of the official generate on
    the request `omni chat` builds for that file and prompt (greedy); cached."""
    from omni.reference import reference_generate
    from omni.serve.cli import build_chat_request, parser

    cache = {}

    def run(path, kind, prompt, max_tokens, use_audio_in_video=False):
        key = (str(path), kind, prompt, max_tokens, use_audio_in_video)
        if key not in cache:
            argv = ["chat", f"--{kind}", str(path), "--max-tokens", str(max_tokens), prompt]
            if use_audio_in_video:
                argv.insert(1, "--use-audio-in-video")
            cache[key] = reference_generate(tiny, build_chat_request(parser().parse_args(argv)))
        return cache[key]

    return run

