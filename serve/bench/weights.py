"""Parameter counts per stage of the real checkpoints, computed (no download): each part built on the meta device from
the published config.json dimensions below (transformers' default configs are not the released shapes).
`python -m omni.serve.bench.weights` prints the README's memory table inputs. The dimensions are the released
Qwen/Qwen2.5-Omni-7B and Qwen/Qwen3-Omni-30B-A3B-Instruct configs' (check them against config.json when it matters:
the totals agree with the hub's 10.7 B and 35.3 B)."""

from __future__ import annotations

import torch

from omni.architectures import QWEN3_OMNI, QWEN25_OMNI, architecture

__all__ = ["QWEN25_7B", "QWEN3_30B", "RELEASED", "stage_params"]

QWEN25_7B = {
    "thinker_config": {
        "text_config": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
        "vision_config": dict(
            depth=32,
            embed_dim=1280,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        "audio_config": dict(
            encoder_layers=32,
            d_model=1280,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            num_mel_bins=128,
            output_dim=3584,
        ),
    },
    "talker_config": dict(
        hidden_size=896,
        intermediate_size=18944,
        num_hidden_layers=24,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=8448,
        embedding_size=3584,
    ),
}
QWEN3_30B = {
    "thinker_config": {
        "text_config": dict(
            hidden_size=2048,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=152064,
            intermediate_size=768,
        ),
        "vision_config": dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=2048,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        "audio_config": dict(
            encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, output_dim=2048
        ),
    },
    "talker_config": {
        "text_config": dict(
            hidden_size=1024,
            num_hidden_layers=20,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=6,
            moe_intermediate_size=384,
            shared_expert_intermediate_size=768,
            intermediate_size=2048,
            vocab_size=3072,
        ),
        "code_predictor_config": dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=5,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=2048,
            num_code_groups=16,
        ),
        "thinker_hidden_size": 2048,
        "num_code_groups": 16,
        "spatial_merge_size": 2,
    },
    "code2wav_config": dict(
        hidden_size=1024, num_hidden_layers=8, codebook_size=2048, num_quantizers=16, decoder_dim=1536
    ),
}
RELEASED = {QWEN25_OMNI.name: QWEN25_7B, QWEN3_OMNI.name: QWEN3_30B}  # architecture -> its released config
VOCODER_PART = {QWEN25_OMNI.name: "token2wav", QWEN3_OMNI.name: "code2wav"}  # the vocoder's attribute


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_params(arch: str) -> dict[str, int]:
    """{stage: parameters} of the released checkpoint of `arch`, built on the meta device."""
    record = architecture(arch)
    cls = record.load("hf_model")
    cfg, vocoder = cls.config_class(**RELEASED[arch]), VOCODER_PART[arch]
    with torch.device("meta"):
        model = cls(cfg)
    towers = model.thinker.model
    embed = model.thinker.get_input_embeddings().weight.numel()
    thinker = _count(model.thinker) - _count(towers.visual) - _count(towers.audio_tower)
    out = {
        "thinker (language model)": thinker,
        "of which the embedding table": embed,
        "vision encoder": _count(towers.visual),
        "audio encoder": _count(towers.audio_tower),
        "talker": _count(model.talker),
        vocoder: _count(getattr(model, vocoder)),
        "total": _count(model),
    }
    tc = cfg.thinker_config.text_config
    if hasattr(tc, "moe_intermediate_size"):  # a mixture of experts (Qwen3-Omni's thinker)
        experts = 3 * tc.hidden_size * tc.moe_intermediate_size * tc.num_hidden_layers
        out["thinker active per token"] = thinker - experts * (tc.num_experts - tc.num_experts_per_tok)
    return out


def kv_bytes_per_token(arch: str, dtype_bytes: int = 2) -> dict[str, int]:
    """KV-cache bytes per token of context: the thinker's and the talker's (2 x layers x kv_heads x head_dim)."""
    cfg = RELEASED[arch]
    t, k = cfg["thinker_config"]["text_config"], cfg["talker_config"]
    k = k.get("text_config", k)  # Qwen3's talker nests its decoder's config
    t_hd = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    return {
        "thinker": 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * t_hd * dtype_bytes,
        "talker": 2 * k["num_hidden_layers"] * k["num_key_value_heads"] * k["head_dim"] * dtype_bytes,
    }


if __name__ == "__main__":
    for arch in RELEASED:
        print(arch)
        for stage, n in stage_params(arch).items():
            print(f"  {stage:28s} {n / 1e9:7.3f} B  {2 * n / 2**30:7.2f} GiB bf16")
        print("  KV bytes/token", kv_bytes_per_token(arch))
