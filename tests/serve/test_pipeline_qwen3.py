"""The in-process pipeline on Qwen3-Omni (the same Pipeline, composition and stage wrappers as Qwen2.5; the stage
implementations picked from the checkpoint's config) against the official generate, on the tiny checkpoint with real
media: text ids and all 16 codebooks of every frame equal for every input mix, speech on and off; the offline Code2Wav
waveform within 1e-4 of the official one, the streamed one within MAX_STREAM_ERROR of offline; the first audio after
`first_chunk_frames` frames while the reply is still being written; voices per model; the text-only variant."""

import asyncio
import dataclasses

import numpy as np
import pytest

from omni.reference import reference_generate
from omni.types import (
    AudioChunk,
    AudioPart,
    ChatRequest,
    Finished,
    ImagePart,
    InvalidRequest,
    Message,
    SamplingParams,
    TextPart,
    VideoPart,
)
from omni.decoders import MAX_STREAM_ERROR

OFFLINE_TOL = 1e-4  # offline Code2Wav vs the official generate's waveform, max abs
KINDS = ["text", "image", "audio", "video", "video+audio", "all"]


def make_request(media, kind: str, speak: bool, max_tokens: int = 10, frames: int = 16, **kw) -> ChatRequest:
    parts = {
        "text": lambda: [],
        "image": lambda: [ImagePart(media["image"])],
        "audio": lambda: [AudioPart(media["audio"])],
        "video": lambda: [VideoPart(media["video"])],
        "video+audio": lambda: [VideoPart(media["video"])],
        "all": lambda: [ImagePart(media["image"]), AudioPart(media["audio"]), VideoPart(media["video"])],
    }[kind]()
    return ChatRequest(
        [Message("user", parts + [TextPart(f"Describe the {kind}, please.")])],
        sampling=SamplingParams(max_tokens=max_tokens),
        talker_sampling=SamplingParams(max_tokens=frames),
        speak=speak,
        use_audio_in_video=kind in ("video+audio", "all"),
        **kw,
    )


def run(coro):
    return asyncio.run(coro)


def test_the_checkpoint_picks_the_qwen3_stages(pipeline_qwen3):
    from omni.talker_qwen3 import Qwen3Talker
    from omni.thinker_qwen3 import Qwen3Thinker
    from omni.decoders import Code2Wav

    p = pipeline_qwen3
    assert isinstance(p.thinker, Qwen3Thinker) and isinstance(p.talker, Qwen3Talker)
    assert isinstance(p.vocoder, Code2Wav) and p.voices == ["Aiden", "Chelsie", "Ethan"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("speak", [False, True], ids=["text-out", "speech-out"])
def test_golden_against_reference(pipeline_qwen3, media, cookbook, kind, speak):
    req = make_request(media, kind, speak, voice="Ethan")
    ref = reference_generate(pipeline_qwen3.loaded, cookbook(req))  # the oracle's media: the cookbook's decoding
    out = run(pipeline_qwen3.run(req))
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert out.prompt_tokens == len(ref.prompt_ids)
    if not speak:
        assert out.waveform is None and out.codec_ids == []
        return
    assert out.codec_ids == ref.codec_ids and len(out.codec_ids) == 15  # 16 steps, the last code 0 has no frame
    assert all(len(f) == 16 for f in out.codec_ids)
    offline = pipeline_qwen3.vocoder.offline(out.codec_ids)
    assert len(out.waveform) == len(offline) == len(ref.waveform) == 15 * 1920 - 555
    assert np.abs(offline - ref.waveform).max() <= OFFLINE_TOL
    assert np.abs(out.waveform - offline).max() <= MAX_STREAM_ERROR
    assert float(np.sqrt((out.waveform**2).mean())) > 0.05  # audible


def test_sampled_talker_matches_reference_seeded(pipeline_qwen3, media, cookbook):
    """Greedy Thinker, sampled Talker and code predictor: one per-request generator equals the official global RNG."""
    req = make_request(media, "audio", True)
    req.talker_sampling = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, max_tokens=16, seed=7)
    ref = reference_generate(pipeline_qwen3.loaded, cookbook(req), seed=7)
    out = run(pipeline_qwen3.run(req))
    assert out.token_ids == ref.token_ids and out.codec_ids == ref.codec_ids


def test_unknown_voice_names_this_models_voices(pipeline_qwen3, media):
    with pytest.raises(InvalidRequest, match="valid voices: Aiden, Chelsie, Ethan"):
        run(pipeline_qwen3.run(make_request(media, "text", True, voice="Nobody")))


def test_first_audio_after_the_first_frames_while_text_is_written(pipeline_qwen3, media):
    first = pipeline_qwen3.config.code2wav.first_chunk_frames
    req = make_request(media, "text", True, max_tokens=120, frames=60)

    async def go():
        chunks, thinker_running = [], None
        async for ev in pipeline_qwen3.stream(req):
            if isinstance(ev, AudioChunk):
                if not chunks:
                    thinker_running = pipeline_qwen3.thinker.engine.num_running
                chunks.append(len(ev.pcm))
            if isinstance(ev, Finished):
                return chunks, thinker_running, ev

    chunks, thinker_running, fin = run(go())
    assert chunks[0] == first * 1920 - 555  # the first packet: `first` frames, less the 555 samples held back
    assert fin.completion_tokens >= 100 and fin.codec_tokens == 59
    assert thinker_running == 1, "speech did not stream while the text was being written"
    assert sum(chunks) == 59 * 1920 - 555


def test_concurrent_requests_equal_solo(pipeline_qwen3, media):
    kinds = ["text", "image", "audio", "all"]
    reqs = [
        make_request(media, k, speak=i % 2 == 0, max_tokens=8 + 3 * i, frames=12 + 2 * i) for i, k in enumerate(kinds)
    ]
    solo = [run(pipeline_qwen3.run(dataclasses.replace(r))) for r in reqs]

    async def together():
        return await asyncio.gather(*[pipeline_qwen3.run(dataclasses.replace(r)) for r in reqs])

    for a, b in zip(solo, run(together())):
        assert b.token_ids == a.token_ids and b.codec_ids == a.codec_ids
        if a.waveform is not None:
            assert np.abs(a.waveform - b.waveform).max() <= MAX_STREAM_ERROR


def test_text_only_variant_serves_text_and_refuses_audio(tmp_path_factory, media, cookbook):
    from omni.tiny_qwen3 import build_qwen3_checkpoint
    from omni.serve.pipeline import Pipeline

    path = build_qwen3_checkpoint(tmp_path_factory.mktemp("captioner"), audio_output=False)
    p = Pipeline.from_pretrained(str(path))
    assert p.voices == [] and not p.has_speech
    req = make_request(media, "image", False)
    assert run(p.run(req)).token_ids == reference_generate(p.loaded, cookbook(req)).token_ids
    with pytest.raises(InvalidRequest, match="no speech output"):
        run(p.run(make_request(media, "image", True)))


def test_cancel_frees_slots_in_every_engine(pipeline_qwen3, media):
    req = make_request(media, "audio", True, max_tokens=100, frames=80)

    async def go():
        events = pipeline_qwen3.stream(req)
        async for ev in events:
            if isinstance(ev, AudioChunk):
                break
        await events.aclose()  # what the HTTP layer does when the client disconnects
        for _ in range(100):
            await asyncio.sleep(0.02)
            if pipeline_qwen3.thinker.engine.num_running == pipeline_qwen3.talker.engine.num_running == 0:
                return True
        return False

    assert run(go())


def test_chunked_prefills_keep_deepstack_and_the_talker_prompt_exact(tiny_qwen3, media, cookbook):
    """Thinker and Talker prefilling 16 prompt tokens per step: the deepstack rows of each chunk's vision tokens and
    the accept layer's output chunk by chunk give the same text ids and all 16 codebooks of every frame."""
    from omni.engine import EngineConfig
    from omni.talker import TalkerConfig
    from omni.serve.config import PipelineConfig
    from omni.serve.pipeline import Pipeline

    cfg = PipelineConfig(
        thinker=EngineConfig(prefill_chunk_tokens=16, max_prefill_tokens=16),
        talker=TalkerConfig(prefill_chunk_tokens=16, max_prefill_tokens=16),
    )
    chunked = Pipeline(tiny_qwen3, cfg)
    req = make_request(media, "all", True, voice="Ethan")
    ref = reference_generate(chunked.loaded, cookbook(req))
    out = run(chunked.run(req))
    assert out.token_ids == ref.token_ids and out.codec_ids == ref.codec_ids and len(out.codec_ids) == 15
    for engine in (chunked.thinker.engine, chunked.talker.engine):
        assert engine.num_prefill_chunks >= 2 and engine.max_prefill_tokens_seen == 16


def test_the_talker_skips_its_batch_timer_until_the_first_chunk_has_its_frames(pipeline_qwen3):
    """Code2Wav's first chunk needs first_chunk_frames frames: until a stream has them it is urgent (no step waits
    batch_wait_s for it), after them it is not."""
    from omni.talker_qwen3 import Qwen3TalkerSequence

    talker = pipeline_qwen3.talker
    assert talker.first_audio_frames == pipeline_qwen3.vocoder.config.first_chunk_frames == 2
    seq = Qwen3TalkerSequence(talker, "r", "Ethan", SamplingParams(max_tokens=8), 1)
    assert seq.urgent
    seq.frames = [[0] * 16]
    assert seq.urgent
    seq.frames.append([0] * 16)
    assert not seq.urgent
