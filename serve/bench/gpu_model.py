"""The GPU check's model (serve/bench/gpu.py): the sizes each shape measures, the Qwen2.5-Omni config of a shape (7B
dimensions or tiny) and its build with random weights on a device, wrapped in omni's own stage classes. Like gpu.py it
runs on a bare GPU host: only torch, transformers and omni's own modules, imported where used."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["SHAPES", "omni_config", "Built", "build"]

# per shape: the sizes of every stage's measurements (tiny: seconds on a CPU)
SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(
        batches=(1, 4, 16, 64),
        prompt=128,
        steps=16,
        admit_rows=32,
        admit_context=2048,
        admit_tokens=256,
        talker_batches=(1, 16),
        dit_codes=(24, 48),
        dit_batches=(1, 16),
        dit_reps=3,
        ttfap_c=(1, 16),
        text_tokens=32,
        speech_codes=64,
        pickle_rows=200,
    ),
    "tiny": dict(
        batches=(1, 2),
        prompt=16,
        steps=3,
        admit_rows=2,
        admit_context=64,
        admit_tokens=16,
        talker_batches=(1, 2),
        dit_codes=(24,),
        dit_batches=(1,),
        dit_reps=1,
        ttfap_c=(1, 2),
        text_tokens=6,
        speech_codes=26,
        pickle_rows=20,
    ),
}


def omni_config(shape: str):
    """Qwen2_5OmniConfig from omni.tiny's config dict: `tiny` as it is; `7b` with the released dimensions for the
    Thinker's language model and the Talker, token2wav at its config class's defaults, the encoders tiny."""
    from transformers import Qwen2_5OmniConfig

    from omni.tiny import CODEC_VOCAB, PRESETS, config_dict

    d = config_dict(PRESETS["tiny"], user_token_id=398)
    if shape == "7b":
        rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
        th = d["thinker_config"]
        th["text_config"].update(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_parameters=rope,
        )
        th["vision_config"]["out_hidden_size"] = th["audio_config"]["output_dim"] = 3584  # tiny towers, real width
        d["talker_config"].update(
            embedding_size=3584,
            hidden_size=896,
            intermediate_size=18944,
            num_hidden_layers=24,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=128,
            rope_parameters=rope,
        )
        d["token2wav_config"] = {"dit_config": {"num_embeds": CODEC_VOCAB}, "bigvgan_config": {}}
    elif shape != "tiny":
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(SHAPES)}")
    return Qwen2_5OmniConfig(**d)


class _IdTokenizer:
    """What the Thinker needs of a tokenizer with random weights: ids decode to ' <id>'."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f" {int(i)}" for i in ids)


@dataclasses.dataclass
class Built:
    model: object  # Qwen2_5OmniForConditionalGeneration, eval
    thinker: object  # omni.thinker.Thinker
    talker: object  # omni.talker.Talker
    token2wav: object  # omni.decoders.Token2Wav (float32, as the official path)
    device: torch.device


def build(shape: str, device: str) -> Built:
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni.talker import Talker, TalkerConfig
    from omni.thinker import Thinker
    from omni.tiny import speaker_dict
    from omni.decoders import Token2Wav, VocoderConfig
    from omni.serve.bench.engine import engine_config

    config = omni_config(shape)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with dev:
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=dtype).eval()
    speakers = speaker_dict(config)
    s = SHAPES[shape]
    rows = max(max(s["batches"]), s["admit_rows"] + 1, max(s["ttfap_c"])) + 1
    ec, _ = engine_config(max_num_seqs=rows, kv_cache_tokens=rows * (s["admit_context"] + 512))
    thinker = Thinker(model.thinker, _IdTokenizer(), ec, max_model_len=s["admit_context"] + 1024)
    voc = VocoderConfig(device=str(dev))
    kv = {k: getattr(ec, k) for k in ("max_num_seqs", "kv_cache_tokens") if hasattr(ec, k)}  # the rest: defaults
    tc = TalkerConfig(**kv, first_audio_codes=voc.first_window_codes())
    talker = Talker(model.talker, speakers, model.thinker.get_input_embeddings(), tc)
    return Built(model, thinker, talker, Token2Wav(model.token2wav, speakers, voc), dev)
