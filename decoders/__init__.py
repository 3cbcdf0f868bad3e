"""Speech decoders: Qwen2.5-Omni token2wav (DiT + BigVGAN), offline and chunked-streaming, batched across requests."""
from omni.decoders.token2wav import MIN_STREAM_SNR_DB, Token2Wav, VocoderConfig, VocoderStats, VocoderStream

__all__ = ["Token2Wav", "VocoderConfig", "VocoderStream", "VocoderStats", "MIN_STREAM_SNR_DB"]
