"""Speech decoders: Qwen2.5-Omni token2wav (DiT + BigVGAN), offline and chunked-streaming, batched across requests."""
from omni.decoders.token2wav import (MIN_STREAM_SNR_DB, Token2Wav, VocoderConfig, VocoderStats, VocoderStream,
                                     snr_db)
from omni.decoders.loop import VocoderLoop

__all__ = ["Token2Wav", "VocoderConfig", "VocoderStream", "VocoderStats", "VocoderLoop", "MIN_STREAM_SNR_DB", "snr_db"]
