"""Random-weight Qwen2.5-Omni checkpoints of the real architecture, built offline: `tiny` (tests) and `small`
(benchmarks, where compute must dominate Python overhead).

A checkpoint directory holds what `Qwen2_5OmniForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` need: config + safetensors, `spk_dict.pt` (voices Chelsie and Ethan), and the
processor (a byte-level BPE tokenizer trained here with Qwen's special tokens, the Whisper feature extractor, the
Qwen2-VL image and video processors, the chat template). Building is deterministic: same preset, same bytes.

Token-id layout of the tokenizer (the real checkpoint has the same specials, at 151643.. instead of 384..):
    0 .. 383     byte-level BPE learned on CORPUS
    384 .. 397   SPECIALS, in Qwen's order
    400 .. 402   tts_text_pad / tts_text_start / tts_text_end (outside the tokenizer, as in Qwen)
    410, 411     speaker bos ids of Chelsie and Ethan (spk_dict.pt), also outside the tokenizer
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.prompt import DEFAULT_SYSTEM_PROMPT

__all__ = ["PRESETS", "Preset", "build_checkpoint", "build_processor", "TOKEN_IDS"]


BPE_SIZE = 384
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
]
TOKEN_IDS = {tok: BPE_SIZE + i for i, tok in enumerate(SPECIALS)}
TTS_TEXT_PAD, TTS_TEXT_START, TTS_TEXT_END = 400, 401, 402
SPEAKER_BOS = {"Chelsie": 410, "Ethan": 411}
TEXT_VOCAB = 512  # >= every id above; ids 398.. are plain words (WORDS), so every id the model emits is visible
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zu", "pi", "da"]
WORDS = [f" {a}{b}" for a in _SYLLABLES for b in _SYLLABLES][: TEXT_VOCAB - BPE_SIZE - len(SPECIALS)]
CODEC_VOCAB = 8448  # the real talker vocabulary: keeps codec ids 8292 (pad/eos), 8293 (bos), 8294 (end), 8296 (mask)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in the image?",
    "Describe the audio clip and the video.",
    DEFAULT_SYSTEM_PROMPT,
    "system user assistant hello world 0123456789",
    "Hello, how are you today? I am fine, thanks!",
    "Caption this picture in one sentence. A cat sits on a red sofa near the window.",
    "Über naïve café déjà vu, 你好世界, こんにちは, 안녕하세요 🙂",  # multi-byte UTF-8 for detokenization tests
] + ["system\nuser\nassistant\n"] * 30  # the role words become single tokens


# The official Qwen2.5-Omni chat template, restricted to the content types this project sends.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + DEFAULT_SYSTEM_PROMPT
    + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden: int  # thinker text hidden == vision out_hidden_size == audio output_dim == talker embedding_size
    layers: int  # decoder layers of the thinker and the talker
    heads: int  # attention heads (kv heads = heads // 2)
    enc_hidden: int  # vision / audio encoder width
    enc_layers: int  # vision / audio encoder depth
    dit_hidden: int  # token2wav DiT width (kept small: the DiT is the CPU bottleneck)
    dit_layers: int  # token2wav DiT depth


PRESETS = {
    "tiny": Preset(hidden=32, layers=2, heads=2, enc_hidden=32, enc_layers=2, dit_hidden=32, dit_layers=2),
    "small": Preset(hidden=512, layers=6, heads=8, enc_hidden=256, enc_layers=4, dit_hidden=64, dit_layers=2),
}


def config_dict(p: Preset, user_token_id: int) -> dict:
    ids = TOKEN_IDS
    common = dict(
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
        position_id_per_seconds=25,
        seconds_per_chunk=2,
    )
    head_dim = p.hidden // p.heads
    # mrope_section (t, h, w) sums to head_dim / 2, in the real 16:24:24 proportion
    t = head_dim // 2 // 4
    rope = {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2],
    }
    kv = max(1, p.heads // 2)
    return {
        "enable_audio_output": True,
        "thinker_config": {
            **common,
            "user_token_id": user_token_id,
            "text_config": {
                "vocab_size": TEXT_VOCAB,
                "hidden_size": p.hidden,
                "intermediate_size": 2 * p.hidden,
                "num_hidden_layers": p.layers,
                "num_attention_heads": p.heads,
                "num_key_value_heads": kv,
                "max_position_embeddings": 32768,
                "rope_parameters": rope,
                "tie_word_embeddings": False,
                "bos_token_id": None,
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            "vision_config": {
                "depth": p.enc_layers,
                "hidden_size": p.enc_hidden,
                "intermediate_size": 2 * p.enc_hidden,
                "num_heads": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "in_channels": 3,
                "window_size": 112,
                "fullatt_block_indexes": [p.enc_layers - 1],
                "out_hidden_size": p.hidden,
            },
            "audio_config": {
                "num_mel_bins": 128,
                "encoder_layers": p.enc_layers,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 2 * p.enc_hidden,
                "d_model": p.enc_hidden,
                "max_source_positions": 1500,
                "n_window": 100,
                "output_dim": p.hidden,
            },
        },
        "talker_config": {
            **common,
            "vocab_size": CODEC_VOCAB,
            "tts_text_start_token_id": TTS_TEXT_START,
            "tts_text_end_token_id": TTS_TEXT_END,
            "tts_text_pad_token_id": TTS_TEXT_PAD,
            "embedding_size": p.hidden,
            "hidden_size": p.hidden,
            "intermediate_size": 2 * p.hidden,
            "num_hidden_layers": p.layers,
            "num_attention_heads": p.heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "max_position_embeddings": 32768,
            "rope_parameters": rope,
            "spatial_merge_size": 2,
        },
        "token2wav_config": {
            "dit_config": {
                "hidden_size": p.dit_hidden,
                "num_hidden_layers": p.dit_layers,
                "num_attention_heads": 2,
                "head_dim": p.dit_hidden // 2,
                "ff_mult": 2,
                "emb_dim": 16,
                "mel_dim": 80,
                "repeats": 2,
                "num_embeds": CODEC_VOCAB,  # >= talker vocabulary: a random talker may emit any code
                "block_size": 24,
                "look_ahead_layers": [1],
                "look_backward_layers": [0],
                "max_position_embeddings": 32768,
                "dropout": 0.0,
                "enc_emb_dim": 16,
                "enc_dim": 16,
                "enc_channels": [32, 32, 32, 32, 96],  # last = sum of middle
                "enc_kernel_sizes": [5, 3, 3, 3, 1],
                "enc_dilations": [1, 2, 3, 4, 1],
                "enc_attention_channels": 16,
                "enc_res2net_scale": 2,
                "enc_se_channels": 16,
            },
            "bigvgan_config": {
                "mel_dim": 80,
                "upsample_initial_channel": 64,  # >= 2 ** len(upsample_rates)
                "resblock_kernel_sizes": [3],
                "resblock_dilation_sizes": [[1, 3, 5]],
                "upsample_rates": [5, 3, 2, 2, 2, 2],  # product 240 samples per mel frame -> 24 kHz, 480 per code
                "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
            },
        },
    }


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 20, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]  # tuples, not str
    for i in range(len(vocab), BPE_SIZE):  # pad so the special ids never move
        vocab[f"<|reserved_{i}|>"] = i
    vocab.update(TOKEN_IDS)
    # transformers annotates merges as str | list[str] and unk_token as str; its BPE takes the (a, b) pairs and no
    # unknown token (Qwen's byte-level vocabulary covers every byte) as the checkpoints' tokenizer.json has them
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        unk_token=None,  # type: ignore[arg-type]
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={  # the processor's __init__ reads these names
            "image_token": "<|IMAGE|>",
            "audio_token": "<|AUDIO|>",
            "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>",
            "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
        model_max_length=32768,
        padding_side="left",
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"extra_special_tokens": SPECIALS[1:]}, replace_extra_special_tokens=False)
    tok.add_tokens(WORDS)  # 398 .. 511: a random model may emit any id; let each decode to visible text
    for s, i in TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(s) == i, (s, i)
    assert len(tok) == TEXT_VOCAB, len(tok)
    return tok


def build_processor(processor_cls=None, patch_size: int = 14, image_mean=None, image_std=None):
    """The tiny checkpoint's processor: Qwen2.5-Omni's (14 px patches, CLIP mean/std) unless told otherwise
    (tiny_qwen3.build_qwen3_processor passes Qwen3-Omni's class and geometry); Whisper features, the tiny tokenizer."""
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vis = dict(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=image_mean or [0.48145466, 0.4578275, 0.40821073],
        image_std=image_std or [0.26862954, 0.26130258, 0.27577711],
    )
    fe = WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=300,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )
    return (processor_cls or Qwen2_5OmniProcessor)(
        image_processor=Qwen2VLImageProcessor(**vis),
        video_processor=Qwen2VLVideoProcessor(**vis),
        feature_extractor=fe,
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def speaker_dict(config) -> dict:
    """spk_dict.pt content: {voice: {bos_token: int, cond: [1, enc_emb_dim], ref_mel: [1, T, 80]}}."""
    dit = config.token2wav_config.dit_config
    g = torch.Generator().manual_seed(0)
    return {
        name: {
            "bos_token": bos,
            "cond": torch.randn(1, dit.enc_emb_dim, generator=g),
            "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=g),
        }
        for name, bos in SPEAKER_BOS.items()
    }


@torch.no_grad()
def _init_token2wav(t2w, seed: int = 0) -> None:
    """The library init leaves the DiT ~identity on its noise and BigVGAN near-silent (absmax ~3e-5). Re-initialise
    every linear/conv with fan-in scaled weights, so the speech is audible and every DiT layer (and its attention
    across blocks) matters, then scale BigVGAN's output layer to ~0.2 RMS so little is clipped at +-1."""
    g = torch.Generator().manual_seed(seed)
    for mod in t2w.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            w = mod.weight
            if isinstance(mod, torch.nn.ConvTranspose1d):  # weight [in, out, k]: each output sums in * k / stride taps
                fan_in = w.shape[0] * w.shape[2] / mod.stride[0]
            else:
                fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan_in))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.02)
        elif isinstance(mod, torch.nn.Embedding):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
    voc = t2w.code2wav_bigvgan_model
    mel = torch.randn(1, voc.config.mel_dim, 200, generator=g) * 1.5 - 2.0
    h = voc.conv_pre(voc.process_mel_spectrogram(mel))
    for i in range(voc.num_upsample_layers):
        h = voc.ups[i][0](h)
        h = sum(voc.resblocks[i * voc.num_residual_blocks + j](h) for j in range(voc.num_residual_blocks))
        h = h / voc.num_residual_blocks
    rms = voc.conv_post(voc.activation_post(h)).pow(2).mean().sqrt()
    voc.conv_post.weight.mul_(0.2 / rms)


def build_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Qwen2.5-Omni checkpoint of `preset` to out_dir (deterministic for a seed)."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    user_id = processor.tokenizer.convert_tokens_to_ids("user")
    config = Qwen2_5OmniConfig(**config_dict(PRESETS[preset], user_id))
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    _init_token2wav(model.token2wav, seed)
    speakers = speaker_dict(config)
    model.speaker_map.update(speakers)
    model.save_pretrained(out)
    torch.save(speakers, out / "spk_dict.pt")  # from_pretrained requires it beside the weights
    processor.save_pretrained(out)
    (out / "omni_preset.json").write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    return out
