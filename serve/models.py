"""The stages of a checkpoint, built from the classes its architecture's record names (omni.architectures, chosen
from the checkpoint's config, never from a flag): the composition (serve/compose.py), the stage wrappers
(serve/stages.py) and the HTTP layer are the same for Qwen2.5-Omni and Qwen3-Omni. Used by the in-process pipeline
and by the Ray deployments.
"""

from __future__ import annotations

import dataclasses

import torch

from omni.architectures import Architecture
from omni.checkpoint import LoadedModel, model_architecture, model_config, resolve_model
from omni.engine import EngineConfig
from omni.thinker import Thinker
from omni.serve.config import PipelineConfig

__all__ = ["thinker_of", "talker_of", "vocoder_of", "load_thinker", "load_talker", "load_vocoder"]


def thinker_of(loaded: LoadedModel, config: EngineConfig, max_model_len: int) -> Thinker:
    """The Thinker stage over a loaded model's thinker."""
    return loaded.architecture.load("thinker").from_model(
        loaded.model, loaded.processor.tokenizer, config, max_model_len
    )


def load_thinker(model: str, config: EngineConfig, max_model_len: int, device: str, dtype: str) -> Thinker:
    """The Thinker stage from a checkpoint, loading the thinker's weights only (a Ray replica of its own)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(model)
    arch = model_architecture(model_config(path))
    tok = AutoTokenizer.from_pretrained(path)
    net = _without_towers(arch.load("hf_thinker").from_pretrained(path, dtype=getattr(torch, dtype)))
    return arch.load("thinker").from_thinker(
        net.to(device).eval(), tok, config, max_model_len, AutoConfig.from_pretrained(path)
    )


def _without_towers(net):
    """The thinker without its vision and audio towers (the encoder deployments run them): they are dropped on the
    host before the move to the device, which never sees them (~1.3 GB of a 7B's weights)."""
    for name in ("visual", "audio_tower"):
        if getattr(net.model, name, None) is not None:
            setattr(net.model, name, None)
    return net


def _talker_config(arch: Architecture, config: PipelineConfig):
    """The Talker's config with its first-audio threshold from the vocoder's: codes for Qwen2.5's Token2Wav, frames
    for Qwen3's Code2Wav (the Talker skips its batch timer until a stream has what the vocoder's first window
    needs)."""
    return arch.load("talker").configure(config.talker, getattr(config, arch.vocoder_config))


def talker_of(loaded: LoadedModel, config: PipelineConfig):
    """The Talker stage (keeps the talker, the voices and what it needs of the thinker's embedding table)."""
    arch = loaded.architecture
    return arch.load("talker").from_model(loaded.model, _talker_config(arch, config))


def load_talker(model: str, config: PipelineConfig, device: str, dtype: str):
    """The Talker stage from a checkpoint, loading the talker's weights only (a Ray replica of its own): no thinker
    (but the few rows of its input embedding the Talker reads), no token2wav / code2wav (omni.parts)."""
    from omni.parts import load_talker_part

    part = load_talker_part(model, device=device, dtype=dtype)
    arch = model_architecture(model)
    return arch.load("talker").from_part(part, _talker_config(arch, config))


def _vocoder_config(arch: Architecture, config: PipelineConfig, device: str):
    return dataclasses.replace(getattr(config, arch.vocoder_config), device=device)


def vocoder_of(loaded: LoadedModel, config: PipelineConfig, device: str):
    """The vocoder stage over a loaded model: Token2Wav (Qwen2.5) or Code2Wav (Qwen3), on `device`."""
    arch = loaded.architecture
    return arch.load("vocoder").from_model(loaded.model, _vocoder_config(arch, config, device))


def load_vocoder(model: str, config: PipelineConfig, device: str, dtype: str):
    """The vocoder stage from a checkpoint, loading its weights only. Token2Wav runs in float32 as the official
    path casts it (the record's vocoder_float32); Code2Wav in the serving dtype."""
    arch = model_architecture(model)
    kw = {} if arch.vocoder_float32 else {"dtype": getattr(torch, dtype)}
    return arch.load("vocoder").from_pretrained(model, _vocoder_config(arch, config, device), **kw)
