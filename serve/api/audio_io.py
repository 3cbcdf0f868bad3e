"""Speech out as bytes: float32 PCM -> 16-bit little-endian PCM, a WAV (RIFF) file around it, and every common
format (mp3, Ogg/Opus, FLAC, AAC) through PyAV, streamed chunk by chunk."""

from __future__ import annotations

import struct

import numpy as np

from omni.types import AUDIO_SAMPLE_RATE

__all__ = [
    "pcm16_bytes",
    "wav_bytes",
    "wav_header",
    "AUDIO_FORMATS",
    "ACCEPTED_FORMATS",
    "FORMAT_ALIASES",
    "canonical_format",
    "AudioStreamEncoder",
    "encode_audio",
]

_INT16_SCALE = 32767  # full scale: +1.0 -> 32767, -1.0 -> -32767 (symmetric, so the sign never overflows)


def pcm16_bytes(pcm: np.ndarray) -> bytes:
    """pcm: [n] float (mono, any rate) -> 2n bytes: clipped to [-1, 1], scaled, rounded to nearest, int16 LE."""
    x = np.asarray(pcm, dtype=np.float32).reshape(-1)
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.rint(np.clip(x, -1.0, 1.0) * _INT16_SCALE).astype("<i2").tobytes()


def wav_header(n_bytes: int, sample_rate: int = AUDIO_SAMPLE_RATE, channels: int = 1) -> bytes:
    """The 44-byte canonical RIFF/WAVE header for `n_bytes` of 16-bit PCM data."""
    block_align = channels * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + n_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        sample_rate,
        sample_rate * block_align,
        block_align,
        16,
        b"data",
        n_bytes,
    )


def wav_bytes(pcm: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """pcm: [n] float mono -> a complete WAV file (16-bit PCM, mono, `sample_rate`)."""
    data = pcm16_bytes(pcm)
    return wav_header(len(data), sample_rate) + data


# ---------------------------------------------------------------------------------------------------- other formats
# response_format -> (Content-Type, PyAV container, PyAV codec); wav and pcm are written here, the rest by FFmpeg
AUDIO_FORMATS = {
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),  # raw 16-bit little-endian mono samples at 24 kHz
    "mp3": ("audio/mpeg", "mp3", "libmp3lame"),
    "opus": ("audio/ogg", "ogg", "libopus"),  # Opus in Ogg, as OpenAI sends it
    "flac": ("audio/flac", "flac", "flac"),
    "aac": ("audio/aac", "adts", "aac"),  # AAC-LC in ADTS frames (streamable)
}
FORMAT_ALIASES = {"pcm16": "pcm"}  # other names a chat completion's audio.format may use
# every name audio.format accepts, each alias before its format
ACCEPTED_FORMATS = tuple(n for f in AUDIO_FORMATS for n in (*[a for a, c in FORMAT_ALIASES.items() if c == f], f))


def canonical_format(name: str) -> str:
    """An accepted audio format name -> its AUDIO_FORMATS key (pcm16 -> pcm)."""
    return FORMAT_ALIASES.get(name, name)


_STREAM_WAV_SIZE = 0xFFFFFFFF - 36  # a streamed WAV's data size is unknown: the largest, as streaming servers write


class AudioStreamEncoder:
    """Float32 PCM chunks in, encoded bytes out as soon as the container has them: `feed(pcm) -> bytes` per chunk,
    `close() -> bytes` for the rest (trailers). Every format streams: WAV with an open-ended header, the others
    through PyAV (FFmpeg) muxers that write as they go (mp3, Ogg/Opus, FLAC, ADTS/AAC)."""

    def __init__(self, fmt: str, sample_rate: int = AUDIO_SAMPLE_RATE):
        if fmt not in AUDIO_FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; supported: {', '.join(AUDIO_FORMATS)}")
        self.format, self.sample_rate = fmt, sample_rate
        self.content_type, container, codec = AUDIO_FORMATS[fmt]
        self._header = wav_header(_STREAM_WAV_SIZE, sample_rate) if fmt == "wav" else b""
        self._av = None
        if container is not None:
            import io

            import av

            self._buf = io.BytesIO()
            # Ogg buffers ~1 s per page by default: flush a page every 100 ms so Opus streams too
            opts = {"page_duration": "100000"} if container == "ogg" else {}
            self._av = av.open(self._buf, "w", format=container, options=opts)
            self._stream = self._av.add_stream(codec, rate=sample_rate, layout="mono")
            self._fifo = av.AudioFifo()
            self._sent = 0

    def _take(self) -> bytes:
        data = self._buf.getvalue()
        out, self._sent = data[self._sent :], len(data)
        return out

    def _mux(self, frames) -> bytes:
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._av.mux(packet)
        return self._take()

    def feed(self, pcm: np.ndarray) -> bytes:
        data = pcm16_bytes(pcm)
        if self._av is None:
            head, self._header = self._header, b""
            return head + data
        import av

        frame = av.AudioFrame.from_ndarray(np.frombuffer(data, "<i2")[None], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        self._fifo.write(frame)
        size = self._stream.codec_context.frame_size or 1024  # codecs with fixed frames (mp3 1152, aac 1024, ...)
        frames = []
        while self._fifo.samples >= size:
            frames.append(self._fifo.read(size))
        return self._mux(frames)

    def close(self) -> bytes:
        if self._av is None:
            head, self._header = self._header, b""
            return head
        rest = self._fifo.read() if self._fifo.samples else None
        out = self._mux([rest] if rest is not None else [])
        for packet in self._stream.encode(None):  # flush the encoder
            self._av.mux(packet)
        self._av.close()  # trailer (the muxer may also rewrite its header in place: the sent one stays valid)
        return out + self._take()


def encode_audio(pcm: np.ndarray, fmt: str, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """A whole utterance in `fmt`: wav with exact sizes, pcm raw, the rest through AudioStreamEncoder."""
    if fmt == "wav":
        return wav_bytes(pcm, sample_rate)
    if fmt == "pcm":
        return pcm16_bytes(pcm)
    enc = AudioStreamEncoder(fmt, sample_rate)
    return enc.feed(pcm) + enc.close()
