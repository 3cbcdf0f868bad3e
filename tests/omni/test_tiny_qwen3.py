"""The tiny Qwen3-Omni checkpoint: real transformers classes loaded offline, determinism, voices and architecture read
from the config, the text-only variant, and the official generate (omni.reference) on it: text, 16-codebook frames,
audible speech."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    from omni.tiny_qwen3 import build_qwen3_checkpoint

    return build_qwen3_checkpoint(tmp_path_factory.mktemp("thinking"), audio_output=False)


def test_cli_builds_a_deterministic_checkpoint_plain_transformers_loads(tmp_path, tiny_qwen3):
    from transformers import AutoProcessor, Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeProcessor

    from omni.serve.cli import main

    assert main(["make-tiny", "--arch", "qwen3-omni", str(tmp_path / "q3")]) == 0  # the CLI's entry point, in process
    d = tmp_path / "q3"
    assert _digest(d)["model.safetensors"] == _digest(Path(tiny_qwen3.path))["model.safetensors"]  # deterministic
    assert sum(p.stat().st_size for p in d.iterdir()) < 24 * 2**20
    m = Qwen3OmniMoeForConditionalGeneration.from_pretrained(d)
    assert m.has_talker and m.config.talker_config.num_code_groups == 16
    assert m.config.talker_config.codec_eos_token_id == 2150
    assert sorted(m.config.talker_config.speaker_id) == ["aiden", "chelsie", "ethan"]
    assert len(m.config.thinker_config.vision_config.deepstack_visual_indexes) == 2
    assert m.thinker.model.language_model.layers[0].mlp.experts.num_experts == 4  # the MoE Thinker
    for (k, x), (_, y) in zip(m.state_dict().items(), tiny_qwen3.model.state_dict().items()):
        assert torch.equal(x, y.cpu()), k
    assert isinstance(AutoProcessor.from_pretrained(d), Qwen3OmniMoeProcessor)


def test_architecture_and_voices_come_from_the_config(tiny_qwen3, text_only):
    from omni.checkpoint import list_voices, model_arch

    assert tiny_qwen3.arch == model_arch(tiny_qwen3.path) == model_arch("tiny-qwen3") == "qwen3-omni"
    assert model_arch("tiny") == "qwen2.5-omni"
    assert tiny_qwen3.voices == list_voices("tiny-qwen3") == ["Aiden", "Chelsie", "Ethan"]
    assert model_arch(str(text_only)) == "qwen3-omni" and list_voices(str(text_only)) == []
    with pytest.raises(ValueError, match="not a Qwen-Omni checkpoint"):
        model_arch({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_text_only_variant_has_no_talker(text_only):
    from omni.checkpoint import load_model

    cfg = json.loads((text_only / "config.json").read_text())
    assert cfg["enable_audio_output"] is False
    from safetensors import safe_open

    with safe_open(str(text_only / "model.safetensors"), "pt") as st:
        assert not [k for k in st.keys() if not k.startswith("thinker.")]
    loaded = load_model(str(text_only))
    assert not loaded.has_speech and loaded.voices == []


@pytest.fixture(scope="module")
def request_all(media_dir):
    from omni.encoders.media import MediaPolicy, load_audio, load_image

    policy = MediaPolicy(allowed_local_media_path=str(media_dir))
    parts = [
        ImagePart(load_image(str(media_dir / "image.png"), policy)),
        AudioPart(load_audio(str(media_dir / "speech.wav"), policy)),
        TextPart("What do you see and hear?"),
    ]
    return ChatRequest(
        [Message("user", parts)],
        sampling=SamplingParams(max_tokens=8),
        talker_sampling=SamplingParams(max_tokens=20),
        speak=True,
        voice="Ethan",
    )


def test_reference_speaks_in_frames_of_16_codebooks(tiny_qwen3, request_all):
    from omni.reference import reference_generate

    ref = reference_generate(tiny_qwen3, request_all)
    text = reference_generate(tiny_qwen3, ChatRequest(request_all.messages, request_all.sampling))
    assert ref.token_ids == text.token_ids and len(ref.token_ids) == 8
    assert text.codec_ids == [] and text.waveform is None
    frames = np.array(ref.codec_ids)
    assert frames.shape == (19, 16)  # 20 talker steps without EOS: the last codebook-0 id gets no frame
    assert frames.min() >= 0 and frames.max() < 2048
    assert ref.waveform.dtype == np.float32 and len(ref.waveform) == 19 * 1920 - 555  # causal deconvs drop 555
    assert 0.05 < float(np.sqrt((ref.waveform**2).mean())) < 0.5  # audible, barely clipped
    assert float((np.abs(ref.waveform) >= 1).mean()) < 1e-3
