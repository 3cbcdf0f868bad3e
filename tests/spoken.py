"""Speech made on the machine for the tests: espeak-ng's voice resampled by ffmpeg (both installed by `make setup`)."""

import subprocess
from pathlib import Path


def espeak_wav(text: str, path: Path, rate: int, pad_s: float = 0.0) -> Path:
    """`text` spoken by espeak-ng, then `pad_s` seconds of silence, as a mono PCM16 WAV at `rate` Hz at `path`."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    pad = ["-af", f"apad=pad_dur={pad_s:g}"] if pad_s else []
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), *pad, "-ar", str(rate), "-ac", "1"]
    subprocess.run([*cmd, "-c:a", "pcm_s16le", str(path)], check=True, capture_output=True)
    return path
