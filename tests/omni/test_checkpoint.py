"""The tiny checkpoint: real transformers classes, offline round trip, determinism, processor, voices, presets."""

import hashlib
import json

import numpy as np
import pytest
import torch


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from omni.tiny import build_checkpoint

    a = build_checkpoint(tmp_path_factory.mktemp("a"))
    b = build_checkpoint(tmp_path_factory.mktemp("b"))
    return a, b


def test_build_is_deterministic(built):
    a, b = built
    da, db = _digest(a), _digest(b)
    assert {"model.safetensors", "spk_dict.pt", "config.json", "tokenizer.json"} <= set(da)
    assert da["model.safetensors"] == db["model.safetensors"]
    assert da["spk_dict.pt"] == db["spk_dict.pt"] and da["tokenizer.json"] == db["tokenizer.json"]
    assert sum(p.stat().st_size for p in a.iterdir()) < 8 * 2**20  # a few MB


def test_round_trip_with_official_classes(built):
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    a, _ = built
    m = Qwen2_5OmniForConditionalGeneration.from_pretrained(a)
    assert sorted(m.speaker_map) == ["Chelsie", "Ethan"]
    n = sum(p.numel() for p in m.parameters())
    assert 5e5 < n < 3e6  # about 1M parameters
    again = Qwen2_5OmniForConditionalGeneration.from_pretrained(a)
    for (k, x), (_, y) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), k
    proc = AutoProcessor.from_pretrained(a)
    assert isinstance(proc, Qwen2_5OmniProcessor)
    assert type(proc.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert "Qwen2VL" in type(proc.image_processor).__name__ and "Qwen2VL" in type(proc.video_processor).__name__


def test_tokenizer_has_qwen_specials_and_chat_template(tiny):
    from omni.prompt import DEFAULT_SYSTEM_PROMPT
    from omni.tiny import TOKEN_IDS

    tok = tiny.processor.tokenizer
    for s, i in TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(s) == i
    text = "Hello, 你好 🙂"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any UTF-8 round-trips
    assert len(tok) == 512  # every id of the text vocabulary decodes to something visible
    assert all(tok.decode([i]) for i in range(398, 512))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    prompt = tiny.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_processor_expands_placeholders(tiny, speech):
    from PIL import Image

    from omni.prompt import prepare_prompt
    from omni.types import AudioPart, ChatRequest, ImagePart, Message, TextPart

    img = Image.new("RGB", (112, 84), (10, 200, 30))
    p = prepare_prompt(
        tiny.processor, ChatRequest([Message("user", [ImagePart(img), AudioPart(speech), TextPart("What?")])])
    )
    ids = p.input_ids
    from omni.tiny import TOKEN_IDS

    # 84x112 -> 6x8 patches -> 3x4 tokens
    assert int((ids == TOKEN_IDS["<|IMAGE|>"]).sum()) == p.images[0].num_tokens == 12
    n_audio = int((ids == TOKEN_IDS["<|AUDIO|>"]).sum())
    frames = p.audios[0].features.shape[-1]
    assert abs(frames - len(speech) / 160) <= 1  # 100 feature frames per second
    assert n_audio == ((frames - 1) // 2 + 1 - 2) // 2 + 1  # conv stride 2, then pooling stride 2


def test_speech_is_audible(tiny):
    t2w = tiny.model.token2wav
    spk = tiny.model.speaker_map["Chelsie"]
    torch.manual_seed(0)
    codes = torch.randint(0, 8000, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wav = t2w(codes, conditioning=spk["cond"], reference_mel=spk["ref_mel"]).reshape(-1).float().numpy()
    assert wav.shape == (50 * 480,)
    rms = float(np.sqrt((wav**2).mean()))
    assert rms > 0.02 and np.abs(wav).max() <= 1.0  # audible, unlike the library init (absmax ~3e-5)


def test_resolve_model(tmp_path, monkeypatch):
    from omni.checkpoint import RECIPE_VERSION, resolve_model

    monkeypatch.setenv("OMNI_CACHE", str(tmp_path))
    path = resolve_model("tiny")
    target = tmp_path / f"tiny-v{RECIPE_VERSION}"
    assert (target / "model.safetensors").exists() and path == str(target)
    assert json.loads((target / "omni_preset.json").read_text())["preset"] == "tiny"
    assert resolve_model("Qwen/Qwen2.5-Omni-7B") == "Qwen/Qwen2.5-Omni-7B"  # a hub id passes through
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_small_preset_config():
    from omni.tiny import PRESETS, config_dict

    cfg = config_dict(PRESETS["small"], user_token_id=6)
    text = cfg["thinker_config"]["text_config"]
    assert text["hidden_size"] >= 512 and text["num_hidden_layers"] >= 4
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2


def test_generation_defaults_follow_the_checkpoint(tmp_path, tiny):
    import shutil

    from omni.checkpoint import generation_defaults
    from omni.types import SamplingParams

    assert generation_defaults(tiny.path) == SamplingParams()  # the tiny config says nothing: greedy
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.path, ckpt)
    cfg = json.loads((ckpt / "generation_config.json").read_text())
    cfg.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    (ckpt / "generation_config.json").write_text(json.dumps(cfg))
    d = generation_defaults(str(ckpt))
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.7, 0.8, 20, 1.05)
