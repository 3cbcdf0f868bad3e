"""Random-weight Qwen3-Omni (MoE) checkpoints of the real architecture, built offline: `tiny-qwen3` (tests) and
`small-qwen3` (benchmarks). The Qwen2.5 builder's sibling (omni/tiny.py): same tokenizer (ids 384.. for Qwen's
specials), same chat template, a `Qwen3OmniMoeProcessor`, and `Qwen3OmniMoeForConditionalGeneration` weights that
plain transformers loads offline (`from_pretrained(dir)`, `AutoProcessor.from_pretrained(dir)`).

Qwen3 keeps its voices in the config (`talker_config.speaker_id`: chelsie / ethan / aiden -> codec ids), not in a
spk_dict.pt. `audio_output=False` writes a text-only checkpoint (`enable_audio_output: false`, no talker and no
code2wav weights), the shape of the Thinking and Captioner releases.

Facts the config below encodes (transformers 5.23/5.24):
- the talker's text config reads `shared_expert_intermediate_size` and the talker config `spatial_merge_size`,
  neither declared: without them construction raises AttributeError;
- with audio in the prompt `talker.get_rope_index` reads `talker_config.audio_config.n_window`, an undeclared
  sub-config that no checkpoint has: omni.checkpoint.load_model sets it to the thinker's at load time;
- the real codec ids (pad 2148, bos 2149, eos 2150, think 2155-2157, speakers 2301-2303) inside the real talker
  vocabulary (3072; `generate` suppresses [2048, 3072) but the eos); 16 code groups, codebooks of 2048;
- `position_id_per_seconds` 13, the processor's default, so the video/audio interleaving and the M-RoPE agree;
- the talker's MoE experts are left uninitialised by the library (torch.empty): drawn here, seeded;
- a random Code2Wav is near-silent (absmax ~1e-5): its convolutions are re-initialised with fan-in scaled weights
  and its output layer scaled to ~0.15 RMS (little is clipped at +-1).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.tiny import TEXT_VOCAB, TOKEN_IDS, build_processor

__all__ = ["QWEN3_PRESETS", "Qwen3Preset", "build_qwen3_checkpoint", "build_qwen3_processor", "QWEN3_VOICES"]

TTS_PAD, TTS_BOS, TTS_EOS = 400, 401, 402  # outside the tokenizer, as in Qwen (151671..151673 in the real one)
QWEN3_VOICES = {"chelsie": 2301, "ethan": 2302, "aiden": 2303}  # talker_config.speaker_id: voice -> codec id
CODEC_VOCAB = 3072  # the real talker vocabulary
CODEBOOK = 2048  # entries per codebook (code predictor vocabulary, Code2Wav codebook_size)
CODE_GROUPS = 16  # codebooks per 80 ms frame: 1 from the talker, 15 from its code predictor


@dataclass(frozen=True)
class Qwen3Preset:
    hidden: int  # thinker text hidden == vision out_hidden_size == audio output_dim == talker thinker_hidden_size
    layers: int  # thinker text layers
    heads: int  # attention heads of the thinker and talker (kv heads = heads // 2)
    experts: int  # MoE experts per layer (thinker and talker), top-2 routed
    talker_hidden: int  # talker width (the real one is narrower than the thinker: 1024 vs 2048)
    talker_layers: int
    predictor_layers: int  # code predictor depth (real: 5)
    enc_hidden: int  # vision / audio encoder width
    enc_layers: int  # vision / audio encoder depth (deepstack taps the first min(2, depth) vision layers)
    c2w_hidden: int  # Code2Wav transformer width
    c2w_layers: int  # Code2Wav transformer depth
    c2w_window: int  # Code2Wav sliding window (real 72; smaller here so short test utterances span several)
    c2w_decoder: int  # Code2Wav decoder_dim (real 1536)


QWEN3_PRESETS = {
    "tiny-qwen3": Qwen3Preset(
        hidden=32,
        layers=3,
        heads=2,
        experts=4,
        talker_hidden=32,
        talker_layers=2,
        predictor_layers=2,
        enc_hidden=32,
        enc_layers=2,
        c2w_hidden=32,
        c2w_layers=2,
        c2w_window=8,
        c2w_decoder=32,
    ),
    "small-qwen3": Qwen3Preset(
        hidden=512,
        layers=6,
        heads=8,
        experts=8,
        talker_hidden=256,
        talker_layers=4,
        predictor_layers=2,
        enc_hidden=256,
        enc_layers=4,
        c2w_hidden=128,
        c2w_layers=4,
        c2w_window=72,
        c2w_decoder=128,
    ),
}


def _rope(head_dim: int) -> dict:
    # mrope_section (t, h, w) sums to head_dim / 2, in the real 24:20:20 proportion; interleaved as in Qwen3
    half = head_dim // 2
    t = round(half * 24 / 64)
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [t, h, half - t - h], "interleaved": True}


def config_dict(p: Qwen3Preset, user_id: int, assistant_id: int, system_id: int, audio_output: bool = True) -> dict:
    ids = TOKEN_IDS
    mm = dict(
        audio_token_id=ids["<|AUDIO|>"],
        image_token_id=ids["<|IMAGE|>"],
        video_token_id=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],
        position_id_per_seconds=13,
    )
    head_dim = p.hidden // p.heads
    kv = max(1, p.heads // 2)
    audio = {
        "num_mel_bins": 128,
        "encoder_layers": p.enc_layers,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 2 * p.enc_hidden,
        "d_model": p.enc_hidden,
        "output_dim": p.hidden,
        "n_window": 50,
        "n_window_infer": 800,
        "conv_chunksize": 500,
        "downsample_hidden_size": 16,
        "max_source_positions": 1500,
    }
    moe = dict(num_experts=p.experts, num_experts_per_tok=2, decoder_sparse_step=1)
    cfg = {
        "enable_audio_output": audio_output,
        "im_start_token_id": ids["<|im_start|>"],
        "im_end_token_id": ids["<|im_end|>"],
        "tts_pad_token_id": TTS_PAD,
        "tts_bos_token_id": TTS_BOS,
        "tts_eos_token_id": TTS_EOS,
        "system_token_id": system_id,
        "user_token_id": user_id,
        "assistant_token_id": assistant_id,
        "thinker_config": {
            **mm,
            "user_token_id": user_id,
            "text_config": {
                "vocab_size": TEXT_VOCAB,
                "hidden_size": p.hidden,
                "intermediate_size": 2 * p.hidden,
                "moe_intermediate_size": p.hidden,
                "num_hidden_layers": p.layers,
                "num_attention_heads": p.heads,
                "num_key_value_heads": kv,
                "head_dim": head_dim,
                "rope_parameters": _rope(head_dim),
                "max_position_embeddings": 32768,
                **moe,
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            "vision_config": {
                "depth": p.enc_layers,
                "hidden_size": p.enc_hidden,
                "intermediate_size": 2 * p.enc_hidden,
                "num_heads": 2,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": p.hidden,
                "num_position_embeddings": 2304,
                "deepstack_visual_indexes": list(range(min(2, p.enc_layers))),
            },
            "audio_config": audio,
        },
    }
    if not audio_output:
        return cfg
    t_head = p.talker_hidden // p.heads
    cfg["talker_config"] = {
        **mm,
        "num_code_groups": CODE_GROUPS,
        "thinker_hidden_size": p.hidden,
        "accept_hidden_layer": max(1, p.layers - 1),  # a middle layer's output feeds the talker at media tokens
        "spatial_merge_size": 2,  # undeclared, read by the talker
        "codec_pad_id": 2148,
        "codec_bos_id": 2149,
        "codec_eos_token_id": 2150,
        "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157,
        "speaker_id": dict(QWEN3_VOICES),
        "text_config": {
            "vocab_size": CODEC_VOCAB,
            "hidden_size": p.talker_hidden,
            "intermediate_size": 2 * p.talker_hidden,
            "moe_intermediate_size": p.talker_hidden,
            "shared_expert_intermediate_size": 2 * p.talker_hidden,  # undeclared, required
            "num_hidden_layers": p.talker_layers,
            "num_attention_heads": p.heads,
            "num_key_value_heads": kv,
            "head_dim": t_head,
            "rope_parameters": _rope(t_head),
            "max_position_embeddings": 32768,
            **moe,
        },
        "code_predictor_config": {
            "vocab_size": CODEBOOK,
            "hidden_size": p.talker_hidden,
            "intermediate_size": 2 * p.talker_hidden,
            "num_hidden_layers": p.predictor_layers,
            "num_attention_heads": p.heads,
            "num_key_value_heads": kv,
            "head_dim": t_head,
            "num_code_groups": CODE_GROUPS,
        },
    }
    cfg["code2wav_config"] = {
        "codebook_size": CODEBOOK,
        "num_quantizers": CODE_GROUPS,
        "hidden_size": p.c2w_hidden,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": p.c2w_layers,
        "intermediate_size": 2 * p.c2w_hidden,
        "sliding_window": p.c2w_window,
        "decoder_dim": p.c2w_decoder,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],  # 2 * 2 * 8 * 5 * 4 * 3 = 1920 samples per frame
    }
    return cfg


def build_qwen3_processor():
    from transformers import Qwen3OmniMoeProcessor

    # Qwen3-Omni's vision geometry: 16 px patches (3 * 2 * 16 * 16 = 1536 values per patch), merge 2, mean/std 0.5
    return build_processor(Qwen3OmniMoeProcessor, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@torch.no_grad()
def _init_talker_experts(talker, seed: int = 0) -> None:
    """transformers 5.23/5.24 leaves the talker's MoE expert tensors (torch.empty, [experts, ...]) uninitialised:
    random memory, different on every build. Draw them as the thinker's are: normal(0, initializer_range)."""
    g = torch.Generator().manual_seed(seed + 1)
    std = talker.config.text_config.initializer_range
    for mod in talker.modules():
        if type(mod).__name__ == "Qwen3OmniMoeTalkerTextExperts":
            for p in (mod.gate_up_proj, mod.down_proj):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def _init_code2wav(c2w, seed: int = 0) -> None:
    """Fan-in scaled weights for every conv / linear of Code2Wav (the library init leaves it near-silent, absmax
    ~1e-5), layer scales at 1 so the transformer matters, then the output conv scaled to ~0.15 RMS on random codes."""
    g = torch.Generator().manual_seed(seed)
    for mod in c2w.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            w = mod.weight
            # ConvTranspose1d weight is [in, out / groups, k]: each output sums in * k / stride taps
            fan_in = (
                w.shape[0] * w.shape[2] / mod.stride[0] if isinstance(mod, torch.nn.ConvTranspose1d) else w[0].numel()
            )
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan_in))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.02)
        elif isinstance(mod, torch.nn.Embedding):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
    for layer in c2w.pre_transformer.layers:
        layer.self_attn_layer_scale.scale.fill_(1.0)
        layer.mlp_layer_scale.scale.fill_(1.0)
    for blocks in c2w.upsample:  # ConvNeXt gamma starts at 1e-6: the blocks would be identities
        blocks[1].gamma.fill_(1.0)
    codes = torch.randint(0, c2w.config.codebook_size, (1, c2w.config.num_quantizers, 24), generator=g)
    post = c2w.decoder[-1].conv
    if post.bias is not None:
        post.bias.zero_()
    seen = []
    hook = post.register_forward_hook(lambda mod, args, out: seen.append(out))  # before forward's clamp to [-1, 1]
    try:
        c2w(codes)
    finally:
        hook.remove()
    scale = 0.15 / float(seen[0].pow(2).mean().sqrt().clamp_min(1e-6))
    post.weight.mul_(float(f"{scale:.3g}"))  # rounded: the RMS's last bits depend on the thread count


def build_qwen3_checkpoint(
    out_dir: str | os.PathLike, preset: str = "tiny-qwen3", seed: int = 0, audio_output: bool = True
) -> Path:
    """Write a random-weight Qwen3-Omni checkpoint of `preset` to out_dir (deterministic for a seed)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    if preset not in QWEN3_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(QWEN3_PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_qwen3_processor()
    tok = processor.tokenizer
    user, assistant, system = (tok.convert_tokens_to_ids(w) for w in ("user", "assistant", "system"))
    config = Qwen3OmniMoeConfig(**config_dict(QWEN3_PRESETS[preset], user, assistant, system, audio_output))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    if audio_output:
        _init_talker_experts(model.talker, seed)
        with torch.no_grad():  # a random talker would often stop at once: make its EOS logit small (rare, possible)
            model.talker.codec_head.weight[config.talker_config.codec_eos_token_id].mul_(0.25)
        _init_code2wav(model.code2wav, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "omni_preset.json").write_text(
        json.dumps({"preset": preset, "seed": seed, "audio_output": audio_output}) + "\n"
    )
    return out
