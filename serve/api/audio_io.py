"""Speech out as bytes: float32 PCM -> 16-bit little-endian PCM, and a WAV (RIFF) file around it."""
from __future__ import annotations

import struct

import numpy as np

from omni.types import AUDIO_SAMPLE_RATE

__all__ = ["pcm16_bytes", "wav_bytes", "wav_header"]

_INT16_SCALE = 32767  # full scale: +1.0 -> 32767, -1.0 -> -32767 (symmetric, so the sign never overflows)


def pcm16_bytes(pcm: np.ndarray) -> bytes:
    """pcm: [n] float (mono, any rate) -> 2n bytes: clipped to [-1, 1], scaled, rounded to nearest, int16 LE."""
    x = np.asarray(pcm, dtype=np.float32).reshape(-1)
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.rint(np.clip(x, -1.0, 1.0) * _INT16_SCALE).astype("<i2").tobytes()


def wav_header(n_bytes: int, sample_rate: int = AUDIO_SAMPLE_RATE, channels: int = 1) -> bytes:
    """The 44-byte canonical RIFF/WAVE header for `n_bytes` of 16-bit PCM data."""
    block_align = channels * 2
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + n_bytes, b"WAVE", b"fmt ", 16, 1, channels, sample_rate,
                       sample_rate * block_align, block_align, 16, b"data", n_bytes)


def wav_bytes(pcm: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """pcm: [n] float mono -> a complete WAV file (16-bit PCM, mono, `sample_rate`)."""
    data = pcm16_bytes(pcm)
    return wav_header(len(data), sample_rate) + data
