"""The stage implementations of each architecture, picked from the checkpoint's config (omni.checkpoint.model_arch),
never from a flag: the composition (serve/compose.py), the stage wrappers (serve/stages.py) and the HTTP layer are
the same for Qwen2.5-Omni and Qwen3-Omni. Used by the in-process pipeline and by the Ray deployments.

    stage      qwen2.5-omni                        qwen3-omni
    encoders   VisionEncoder, AudioEncoder         Qwen3VisionEncoder (deepstack), Qwen3AudioEncoder
    thinker    omni.thinker.Thinker                omni.thinker_qwen3.Qwen3Thinker (MoE)
    talker     omni.talker.Talker                  omni.talker_qwen3.Qwen3Talker (+ code predictor)
    vocoder    omni.decoders.Token2Wav             omni.decoders.Code2Wav
"""
from __future__ import annotations

import dataclasses

import torch

from omni.checkpoint import LoadedModel, model_arch, model_config, resolve_model
from omni.engine import EngineConfig
from omni.talker import Talker
from omni.thinker import Thinker
from omni.serve.config import PipelineConfig

__all__ = ["thinker_of", "talker_of", "vocoder_of", "load_thinker", "load_talker", "load_vocoder"]


def thinker_of(loaded: LoadedModel, config: EngineConfig, max_model_len: int) -> Thinker:
    """The Thinker stage over a loaded model's thinker."""
    tok = loaded.processor.tokenizer
    if loaded.arch == "qwen3-omni":
        from omni.thinker_qwen3 import Qwen3Thinker

        return Qwen3Thinker.from_model(loaded.model, tok, config, max_model_len)
    return Thinker(loaded.model.thinker, tok, config, max_model_len)


def load_thinker(model: str, config: EngineConfig, max_model_len: int, device: str, dtype: str) -> Thinker:
    """The Thinker stage from a checkpoint, loading the thinker's weights only (a Ray replica of its own)."""
    from transformers import (AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration,
                              Qwen3OmniMoeThinkerForConditionalGeneration)

    path = resolve_model(model)
    cfg = model_config(path)
    tok = AutoTokenizer.from_pretrained(path)
    if model_arch(cfg) == "qwen3-omni":
        from transformers import Qwen3OmniMoeConfig

        from omni.thinker_qwen3 import Qwen3Thinker

        net = _without_towers(Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(path,
                                                                                          dtype=getattr(torch, dtype)))
        full = Qwen3OmniMoeConfig.from_pretrained(path)
        talker = full.talker_config if cfg.get("enable_audio_output", True) else None
        return Qwen3Thinker(net.to(device).eval(), tok, config, max_model_len, talker, full.im_start_token_id,
                            full.assistant_token_id)
    net = _without_towers(Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)))
    return Thinker(net.to(device).eval(), tok, config, max_model_len)


def _without_towers(net):
    """The thinker without its vision and audio towers (the encoder deployments run them): they are dropped on the
    host before the move to the device, which never sees them (~1.3 GB of a 7B's weights)."""
    for name in ("visual", "audio_tower"):
        if getattr(net.model, name, None) is not None:
            setattr(net.model, name, None)
    return net


def talker_of(loaded: LoadedModel, config: PipelineConfig):
    """The Talker stage (keeps the talker, the voices and what it needs of the thinker's embedding table). It skips
    its batch timer until a stream has what the vocoder's first window needs (its first audio pending): codes for
    Qwen2.5's Token2Wav, frames for Qwen3's Code2Wav."""
    if loaded.arch == "qwen3-omni":
        from omni.talker_qwen3 import Qwen3Talker

        talker = dataclasses.replace(config.talker, first_audio_frames=config.code2wav.first_chunk_frames)
        return Qwen3Talker.from_model(loaded.model, talker)
    talker = dataclasses.replace(config.talker, first_audio_codes=config.vocoder.first_window_codes())
    return Talker.from_model(loaded.model, talker)


def load_talker(model: str, config: PipelineConfig, device: str, dtype: str):
    """The Talker stage from a checkpoint, loading the talker's weights only (a Ray replica of its own): no thinker
    (but the few rows of its input embedding the Talker reads), no token2wav / code2wav (omni.parts)."""
    from omni.parts import load_talker_part

    part = load_talker_part(model, device=device, dtype=dtype)
    if part.arch == "qwen3-omni":
        from omni.talker_qwen3 import Qwen3Talker

        talker = dataclasses.replace(config.talker, first_audio_frames=config.code2wav.first_chunk_frames)
        return Qwen3Talker(part.talker, part.tts_embeds, part.tts_pad_id, talker)
    talker = dataclasses.replace(config.talker, first_audio_codes=config.vocoder.first_window_codes())
    return Talker(part.talker, part.speakers, part.thinker_embed, talker)


def vocoder_of(loaded: LoadedModel, config: PipelineConfig, device: str):
    """The vocoder stage over a loaded model: Token2Wav (Qwen2.5) or Code2Wav (Qwen3), on `device`."""
    if loaded.arch == "qwen3-omni":
        from omni.decoders import Code2Wav

        return Code2Wav(loaded.model.code2wav, dataclasses.replace(config.code2wav, device=device))
    from omni.decoders import Token2Wav

    return Token2Wav(loaded.model.token2wav, loaded.model.speaker_map,
                     dataclasses.replace(config.vocoder, device=device))


def load_vocoder(model: str, config: PipelineConfig, device: str, dtype: str):
    """The vocoder stage from a checkpoint, loading its weights only. Token2Wav runs in float32 as the official
    path casts it; Code2Wav in the serving dtype."""
    if model_arch(resolve_model(model)) == "qwen3-omni":
        from omni.decoders import Code2Wav

        return Code2Wav.from_pretrained(model, dataclasses.replace(config.code2wav, device=device),
                                        dtype=getattr(torch, dtype))
    from omni.decoders import Token2Wav

    return Token2Wav.from_pretrained(model, dataclasses.replace(config.vocoder, device=device))
