"""Real media for the media-loading tests, made once per session with espeak-ng, ffmpeg and PIL."""

import shutil
import subprocess
from pathlib import Path

import pytest

SPEECH_TEXT = "The quick brown fox jumps over the lazy dog."
CLIP = dict(width=160, height=120, rate=10, seconds=3)  # the test-pattern videos: 30 frames


def _ffmpeg(*args, stdout=None):
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", *map(str, args)], check=True, stdout=stdout, stderr=subprocess.PIPE
    )


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """name -> file in one directory (the tests' allowed media directory):
    speech: raw.wav (espeak-ng, 22.05 kHz), speech.{wav,flac,mp3,ogg} (mono 22.05 kHz), stereo.flac (44.1 kHz,
      2 channels), stream.mka (Matroska written to a pipe: no declared duration), cover.mp3 (with cover art);
    video: clip.{mp4,webm,mkv} (160x120 test pattern, 10 fps, 3 s, the speech as its audio track), noaudio.mp4,
      counter.mkv (64x48 gray frames whose brightness grows with the frame index, 10 fps, 3 s);
    images: image.{png,jpg,webp} (96x64 RGB), rgba.png (half transparent)."""
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make setup` (it installs the Debian packages the tests need)")
    d = tmp_path_factory.mktemp("allowed")
    f = {}
    f["raw.wav"] = d / "raw.wav"
    subprocess.run(["espeak-ng", "-w", str(f["raw.wav"]), SPEECH_TEXT], check=True, capture_output=True)
    for ext in ("wav", "flac", "mp3", "ogg"):
        f[f"speech.{ext}"] = d / f"speech.{ext}"
        _ffmpeg("-i", f["raw.wav"], "-ac", 1, f[f"speech.{ext}"])
    f["stereo.flac"] = d / "stereo.flac"
    _ffmpeg("-i", f["raw.wav"], "-ac", 2, "-ar", 44100, f["stereo.flac"])
    f["stream.mka"] = d / "stream.mka"
    with open(f["stream.mka"], "wb") as out:
        _ffmpeg("-i", f["raw.wav"], "-c:a", "flac", "-f", "matroska", "pipe:1", stdout=out)

    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 64), (200, 60, 40))
    ImageDraw.Draw(im).rectangle((48, 0, 95, 63), fill=(30, 90, 220))  # left half red, right half blue
    for ext in ("png", "jpg", "webp"):
        f[f"image.{ext}"] = d / f"image.{ext}"
        im.save(f[f"image.{ext}"], quality=95) if ext != "png" else im.save(f[f"image.{ext}"])
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    ImageDraw.Draw(rgba).rectangle((0, 0, 15, 31), fill=(0, 0, 0, 0))  # left half fully transparent
    f["rgba.png"] = d / "rgba.png"
    rgba.save(f["rgba.png"])
    f["cover.mp3"] = d / "cover.mp3"
    _ffmpeg(
        "-i",
        f["raw.wav"],
        "-i",
        f["image.png"],
        "-map",
        "0",
        "-map",
        "1",
        "-c:v",
        "png",
        "-disposition:v",
        "attached_pic",
        f["cover.mp3"],
    )

    pattern = f"testsrc=size={CLIP['width']}x{CLIP['height']}:rate={CLIP['rate']}"
    codecs = {
        "mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"],
        "webm": ["-c:v", "libvpx", "-b:v", "300k", "-c:a", "libopus"],
        "mkv": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "flac"],
    }
    for ext, codec in codecs.items():
        f[f"clip.{ext}"] = d / f"clip.{ext}"
        _ffmpeg("-f", "lavfi", "-i", pattern, "-i", f["raw.wav"], "-t", CLIP["seconds"], *codec, f[f"clip.{ext}"])
    f["noaudio.mp4"] = d / "noaudio.mp4"
    _ffmpeg("-f", "lavfi", "-i", pattern, "-t", CLIP["seconds"], *codecs["mp4"][:4], f["noaudio.mp4"])
    f["counter.mkv"] = d / "counter.mkv"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=black:size=64x48:rate=10:duration=3,geq=lum='16+N*7':cb=128:cr=128",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        10,
        f["counter.mkv"],
    )
    return f
