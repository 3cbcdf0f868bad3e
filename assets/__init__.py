"""Package data: assets/samples/* (a small image, espeak-ng speech, an ffmpeg clip) ship in the wheel as omni.assets."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["samples_dir"]


def samples_dir() -> Path:
    """The bundled sample media (image.png, speech.wav, clip.mp4): in the checkout, or in the installed wheel."""
    return Path(str(files(__name__) / "samples"))
