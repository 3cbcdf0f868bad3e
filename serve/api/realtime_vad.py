"""Server VAD for /v1/realtime: Silero VAD (the `silero-vad` package ships its model; it runs on CPU, no network)
over the session's input audio, in audio time (never wall time): the same audio gives the same turns however fast
it arrives.

    vad = ServerVad(TurnDetection(...))
    for kind, ms in vad.feed(pcm16_24k_bytes):   # ("started", audio_start_ms) / ("stopped", audio_end_ms)

`audio_start_ms` is where speech was first detected less `prefix_padding_ms` (the start of the audio the turn
commits); `audio_end_ms` is where `silence_duration_ms` of silence after the speech had passed (the end of it): both
are milliseconds from the start of all audio appended in the session, as OpenAI's events give them."""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import numpy as np

from omni.serve.api.realtime_events import TurnDetection

__all__ = ["ServerVad", "silero_model"]

VAD_RATE = 16000
WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
WINDOW_MS = WINDOW * 1000 // VAD_RATE
HYSTERESIS = 0.15  # speech goes on while the probability stays above threshold - this (Silero's own rule)

_lock = threading.Lock()


def silero_model():
    """A fresh Silero VAD model (its recurrent state is per stream: one per session). Loaded from the package."""
    from silero_vad import load_silero_vad

    with _lock, warnings.catch_warnings():  # one load at a time; torch.jit.load's deprecation notice is silero's
        warnings.simplefilter("ignore", FutureWarning)
        model = load_silero_vad()
    return model.eval()


class ServerVad:
    def __init__(self, config: TurnDetection, model=None):
        self.config = config
        self.model = model if model is not None else silero_model()
        self.pending = np.zeros(0, np.float32)  # 16 kHz samples not yet in a whole window
        self.windows = 0  # windows processed (the VAD's clock: windows * 32 ms)
        self.offset_ms = 0.0  # session audio before this VAD started (it may be turned on mid-session)
        self.in_speech = False
        self.silence_from: Optional[float] = None  # ms where the current silence began

    def reset(self) -> None:
        """Forget the current speech (after a commit or a clear); the clock goes on."""
        self.in_speech, self.silence_from = False, None
        self.model.reset_states()

    def feed(self, raw: bytes) -> list[tuple[str, int]]:
        """PCM16 24 kHz bytes -> the turn events they complete."""
        import torch
        from scipy.signal import resample_poly

        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        self.pending = np.concatenate([self.pending, resample_poly(x, 2, 3).astype(np.float32)])
        events = []
        cfg = self.config
        while len(self.pending) >= WINDOW:
            window, self.pending = self.pending[:WINDOW], self.pending[WINDOW:]
            start = self.offset_ms + self.windows * WINDOW_MS
            self.windows += 1
            end = start + WINDOW_MS
            with torch.inference_mode():
                p = float(self.model(torch.from_numpy(window.copy()), VAD_RATE))
            if not self.in_speech:
                if p >= cfg.threshold:
                    self.in_speech, self.silence_from = True, None
                    events.append(("started", int(max(0.0, start - cfg.prefix_padding_ms))))
                continue
            if p >= cfg.threshold - HYSTERESIS:
                self.silence_from = None
            else:
                self.silence_from = start if self.silence_from is None else self.silence_from
                if end - self.silence_from >= cfg.silence_duration_ms:
                    self.in_speech, self.silence_from = False, None
                    events.append(("stopped", int(end)))
        return events
