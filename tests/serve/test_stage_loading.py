"""Each replica loads only the weights it runs (omni.parts): the Talker, the encoder towers and the vocoder loaded alone
hold exactly the full model's tensors of their part, far fewer than the whole model, and the Talker built from its
partial load gives the codec ids of the one built over the whole model (greedy and seeded sampling)."""

import asyncio
import dataclasses

import pytest
import torch

from omni.checkpoint import load_model
from omni.parts import load_talker_part, load_tower
from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart
from omni.serve.config import PipelineConfig

PRESETS = ["small", "tiny-qwen3"]


@pytest.fixture(scope="module", params=PRESETS)
def full(request):
    return load_model(request.param, device="cpu")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_same(part: torch.nn.Module, whole: torch.nn.Module) -> None:
    """The same parameter names, shapes, dtypes and values, and the same buffers."""
    mine, theirs = dict(part.named_parameters()), dict(whole.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine)
    bufs, their_bufs = dict(part.named_buffers()), dict(whole.named_buffers())
    assert bufs.keys() == their_bufs.keys() and all(torch.equal(bufs[k], their_bufs[k]) for k in bufs)


def test_talker_loads_the_talker_and_a_few_embedding_rows(full):
    part = load_talker_part(full.name, device="cpu")
    _assert_same(part.talker, full.model.talker)
    embed = full.model.thinker.get_input_embeddings().weight  # [vocab, H_thinker]
    if full.arch == "qwen3-omni":
        c = full.model.config
        assert torch.equal(part.tts_embeds, embed[[c.tts_bos_token_id, c.tts_eos_token_id, c.tts_pad_token_id]])
        extra = part.tts_embeds.numel()
    else:
        assert torch.equal(part.thinker_embed.weight, embed[part.thinker_embed.ids])
        assert len(part.thinker_embed.ids) <= 8  # the voices' bos ids and tts_text_{bos,eos,pad}
        assert part.speakers.keys() == full.model.speaker_map.keys()
        for voice, spk in part.speakers.items():
            assert all(
                torch.equal(torch.as_tensor(v), torch.as_tensor(full.model.speaker_map[voice][k]))
                for k, v in spk.items()
            )
        extra = _count(part.thinker_embed)
    loaded = _count(part.talker) + extra
    assert _count(part.talker) == _count(full.model.talker)
    # nothing of the thinker but `extra` rows (the small preset's talker is about as large as its thinker)
    assert loaded == _count(full.model) - _count(full.model.thinker) - _count(_vocoder_of(full)) + extra
    print(
        f"{full.name}: talker part {loaded} parameters (of which {extra} thinker embedding values), whole model "
        f"{_count(full.model)}"
    )


@pytest.mark.parametrize("name", ["visual", "audio_tower"])
def test_tower_loads_alone(full, name):
    tower = load_tower(full.name, name)
    whole = getattr(full.model.thinker.model, name)
    assert type(tower).__name__ == type(whole).__name__ and isinstance(tower, type(whole))
    _assert_same(tower, whole)
    assert _count(tower) == _count(whole) < 0.2 * _count(full.model)
    print(f"{full.name}: {name} {_count(tower)} parameters, whole model {_count(full.model)}")


def test_thinker_replica_loads_no_tower(full):
    """The Thinker deployment's stage: the language model and head, no encoder tower, the same weights."""
    from omni.engine import EngineConfig
    from omni.serve.models import load_thinker

    thinker = load_thinker(full.name, EngineConfig(), 4096, "cpu", "float32")
    lm = full.model.thinker
    towers = _count(lm.model.visual) + _count(lm.model.audio_tower)
    assert thinker.model.model.visual is None and thinker.model.model.audio_tower is None
    assert _count(thinker.model) == _count(lm) - towers
    _assert_same(thinker.model.model.language_model, lm.model.language_model)
    _assert_same(thinker.model.lm_head, lm.lm_head)


def _vocoder_of(full) -> torch.nn.Module:
    return full.model.code2wav if full.arch == "qwen3-omni" else full.model.token2wav


def test_vocoder_loads_alone(full):
    from omni.serve.models import load_vocoder

    vocoder = load_vocoder(full.name, PipelineConfig(), "cpu", "float32")
    _assert_same(vocoder.model, _vocoder_of(full))
    assert _count(vocoder.model) < 0.5 * _count(full.model)


def _request(media, sampling: SamplingParams) -> ChatRequest:
    return ChatRequest(
        [Message("user", [ImagePart(media["image"]), AudioPart(media["audio"]), TextPart("Describe both, please.")])],
        sampling=SamplingParams(max_tokens=10),
        talker_sampling=sampling,
        speak=True,
    )


@pytest.mark.parametrize("preset", ["tiny", "small", "tiny-qwen3"])
def test_talker_from_its_own_load_gives_the_same_codes(preset, media):
    """The Pipeline over the whole model, then the same Pipeline with its Talker stage replaced by one loaded alone
    (serve/models.py load_talker, what the Talker replica runs): the same codec ids, greedy and sampled."""
    from omni.serve.models import load_talker
    from omni.serve.pipeline import Pipeline
    from omni.serve.stages import TalkerStage

    loaded = load_model(preset, device="cpu")
    config = PipelineConfig()
    pipeline = Pipeline(loaded, config)
    voice = loaded.voices[0]
    reqs = [
        dataclasses.replace(_request(media, s), voice=voice)
        for s in (
            SamplingParams(max_tokens=30),
            SamplingParams(temperature=0.9, top_k=40, top_p=0.8, max_tokens=30, seed=3),
        )
    ]
    whole = [asyncio.run(pipeline.run(dataclasses.replace(r))) for r in reqs]
    talker = load_talker(preset, config, "cpu", "float32")
    pipeline.stages.talker, pipeline.stages.chain["talker"] = talker, TalkerStage(talker)
    alone = [asyncio.run(pipeline.run(dataclasses.replace(r))) for r in reqs]
    for a, b in zip(whole, alone):
        assert a.token_ids == b.token_ids and len(a.codec_ids) > 0
        assert a.codec_ids == b.codec_ids
