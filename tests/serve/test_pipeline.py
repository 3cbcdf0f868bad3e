"""The in-process staged pipeline against the official transformers path (omni.reference), on the tiny checkpoint
with real media: golden token ids and codec ids, the vocoder's offline and streamed waveforms, concurrency and
streaming order."""

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
from omni.decoders import snr_db

GREEDY_TALKER = SamplingParams(max_tokens=48)
OFFLINE_TOL = 1e-4  # whole-utterance vocoder vs the reference waveform, max abs


def make_request(media, kind: str, speak: bool, max_tokens: int = 12, **kw) -> ChatRequest:
    parts = {
        "text": [],
        "image": [ImagePart(media["image"])],
        "audio": [AudioPart(media["audio"])],
        "video": [VideoPart(media["video"])],
        "video+audio": [VideoPart(media["video"])],
        "all": [ImagePart(media["image"]), AudioPart(media["audio"]), VideoPart(media["video"])],
    }[kind]
    return ChatRequest(
        [Message("user", parts + [TextPart(f"Describe the {kind}, please.")])],
        sampling=SamplingParams(max_tokens=max_tokens),
        talker_sampling=GREEDY_TALKER,
        speak=speak,
        use_audio_in_video=kind in ("video+audio", "all"),
        **kw,
    )


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("kind", ["text", "image", "audio", "video", "video+audio", "all"])
@pytest.mark.parametrize("speak", [False, True], ids=["text-out", "speech-out"])
def test_golden_against_reference(pipeline, media, cookbook, kind, speak, stop_codes):
    req = make_request(media, kind, speak)
    ref = reference_generate(pipeline.loaded, cookbook(req))  # the oracle's media: the cookbook's decoding
    out = run(pipeline.run(req))
    assert out.token_ids == ref.token_ids
    assert out.text == ref.text
    assert out.prompt_tokens == len(ref.prompt_ids)
    if not speak:
        assert out.waveform is None and out.codec_ids == []
        return
    assert out.codec_ids == ref.codec_ids and len(out.codec_ids) > 0
    codes = [c for c in out.codec_ids if c not in stop_codes]
    assert len(out.waveform) == len(ref.waveform) == 480 * len(codes)
    offline = pipeline.vocoder.offline(codes, req.voice, seed=0)
    assert np.abs(offline - ref.waveform).max() <= OFFLINE_TOL
    from omni.decoders import MIN_STREAM_SNR_DB

    assert snr_db(offline, out.waveform) >= MIN_STREAM_SNR_DB
    assert np.abs(out.waveform).max() > 0.01  # audible, not the near-silence of an untouched BigVGAN


def test_sampled_talker_matches_reference_seeded(pipeline, media, cookbook):
    """Greedy Thinker + sampled Talker: our per-request generator equals the official global-RNG draws."""
    req = make_request(media, "audio", True)
    req.talker_sampling = SamplingParams(
        temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, max_tokens=40, seed=7
    )
    ref = reference_generate(pipeline.loaded, cookbook(req), seed=7)
    out = run(pipeline.run(req))
    assert out.token_ids == ref.token_ids and out.codec_ids == ref.codec_ids


def test_streamed_text_equals_offline_text_with_multibyte_utf8(pipeline):
    """Deltas never split a multi-byte character and concatenate to the whole decode."""
    from omni.thinker import Detokenizer

    tok = pipeline.processor.tokenizer
    ids = tok.encode("Über naïve café, 你好世界 🙂 done")
    d = Detokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in x for x in deltas)
    assert sum(1 for x in deltas if x) < len(ids)  # some tokens were held back mid-character


def test_unknown_voice_lists_valid_ones(pipeline, media):
    req = make_request(media, "text", True, voice="Nobody")
    with pytest.raises(InvalidRequest, match="Chelsie.*Ethan"):
        run(pipeline.run(req))


def test_concurrent_requests_equal_solo_and_share_steps(pipeline, media):
    """8 different requests, some with speech, submitted together and staggered: each gets exactly its solo tokens,
    and the engines ran shared batched steps."""
    kinds = ["text", "image", "audio", "video", "video+audio", "all", "text", "audio"]
    # long enough replies that requests overlap in the engines even when their media take different times to prepare
    reqs = [make_request(media, k, speak=i % 2 == 0, max_tokens=24 + 4 * i) for i, k in enumerate(kinds)]
    reqs[6].messages[0].content[-1] = TextPart("A much longer question about the weather, the sea and the sky?")
    solo, solo_steps = [], []
    for r in reqs:
        t0, k0 = pipeline.thinker.engine.num_steps, pipeline.talker.engine.num_steps
        solo.append(run(pipeline.run(dataclasses.replace(r))))
        solo_steps.append(pipeline.thinker.engine.num_steps - t0 + pipeline.talker.engine.num_steps - k0)

    async def together(stagger: float):
        async def one(i, r):
            await asyncio.sleep(stagger * i)
            return await pipeline.run(dataclasses.replace(r))

        return await asyncio.gather(*[one(i, r) for i, r in enumerate(reqs)])

    for stagger, bound in ((0.0, 0.6), (0.05, 0.8)):
        t0, k0 = pipeline.thinker.engine.num_steps, pipeline.talker.engine.num_steps
        outs = run(together(stagger))
        steps = pipeline.thinker.engine.num_steps - t0 + pipeline.talker.engine.num_steps - k0
        for r, a, b in zip(reqs, solo, outs):
            assert b.token_ids == a.token_ids and b.codec_ids == a.codec_ids, r
            if a.waveform is not None:
                assert snr_db(a.waveform, b.waveform) > 100  # batched vocoder calls: equal up to float noise
        assert steps < bound * sum(solo_steps), (stagger, steps, sum(solo_steps))
    assert pipeline.thinker.engine.max_rows_seen >= 4


def test_first_audio_chunk_before_last_text_token(pipeline, media):
    req = make_request(media, "text", True, max_tokens=300)
    req.talker_sampling = SamplingParams(max_tokens=400)

    async def first_audio():
        thinker_running = None
        async for ev in pipeline.stream(req):
            if isinstance(ev, AudioChunk) and thinker_running is None:
                thinker_running = pipeline.thinker.engine.num_running
            if isinstance(ev, Finished):
                return thinker_running, ev

    thinker_running, fin = run(first_audio())
    assert fin.completion_tokens >= 200 and fin.codec_tokens > 24
    assert thinker_running == 1, "speech did not stream while the text was being written"


def test_cancel_frees_slots(pipeline, media):
    """Leaving the stream early cancels the request in every stage: the engines end with no running rows."""
    req = make_request(media, "audio", True, max_tokens=200)
    req.talker_sampling = SamplingParams(max_tokens=400)

    async def go():
        n = 0
        events = pipeline.stream(req)
        async for ev in events:
            n += isinstance(ev, AudioChunk)
            if n:
                break
        await events.aclose()  # what the HTTP layer does when the client disconnects
        for _ in range(50):
            await asyncio.sleep(0.02)
            if pipeline.thinker.engine.num_running == 0 and pipeline.talker.engine.num_running == 0:
                break
        return n

    assert run(go()) == 1
    assert pipeline.thinker.engine.num_running == 0
    assert pipeline.talker.engine.num_running == 0


def test_chunked_prefills_in_both_engines_keep_every_token(tiny, media, cookbook, stop_codes):
    """Thinker and Talker prefilling 16 prompt tokens per step (media included): text and codec ids still equal the
    official path's."""
    from omni.engine import EngineConfig
    from omni.talker import TalkerConfig
    from omni.serve.config import PipelineConfig
    from omni.serve.pipeline import Pipeline

    cfg = PipelineConfig(
        thinker=EngineConfig(prefill_chunk_tokens=16, max_prefill_tokens=16),
        talker=TalkerConfig(prefill_chunk_tokens=16, max_prefill_tokens=16),
    )
    chunked = Pipeline(tiny, cfg)
    req = make_request(media, "all", True)
    ref = reference_generate(chunked.loaded, cookbook(req))
    out = run(chunked.run(req))
    assert out.token_ids == ref.token_ids and out.codec_ids == ref.codec_ids and len(out.codec_ids) > 0
    for engine in (chunked.thinker.engine, chunked.talker.engine):
        assert engine.num_prefill_chunks >= out.prompt_tokens // 16 and engine.max_prefill_tokens_seen == 16
