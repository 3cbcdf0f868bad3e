"""Speech decoders, batched across requests, offline and streaming: Qwen2.5-Omni's token2wav (DiT + BigVGAN) and
Qwen3-Omni's Code2Wav; one vocoder loop serves either."""

from omni.decoders.code2wav import MAX_STREAM_ERROR, Code2Wav, Code2WavConfig, Code2WavStream
from omni.decoders.loop import VocoderLoop
from omni.decoders.token2wav import MIN_STREAM_SNR_DB, Token2Wav, VocoderConfig, VocoderStats, VocoderStream, snr_db

__all__ = [
    "Token2Wav",
    "VocoderConfig",
    "VocoderStream",
    "VocoderStats",
    "VocoderLoop",
    "MIN_STREAM_SNR_DB",
    "snr_db",
    "Code2Wav",
    "Code2WavConfig",
    "Code2WavStream",
    "MAX_STREAM_ERROR",
]
