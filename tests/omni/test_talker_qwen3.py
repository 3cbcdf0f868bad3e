"""Qwen3-Omni's Talker with its code predictor (omni/talker_qwen3.py) on the shared engine, fed by the Qwen3 Thinker,
against the official generate on the tiny checkpoint: all 16 codebooks of every frame equal with seeded sampling
(talker and code predictor drawing from one generator in the official order) and with a stop id; frames of
concurrent requests batch in one talker forward and one code-predictor run per step and equal their solo runs.
(Greedy frames for every input mix are checked end to end in tests/serve/test_pipeline_qwen3.py.)"""

import asyncio
import dataclasses

import pytest

from omni.types import (
    AudioPart,
    ChatRequest,
    ImagePart,
    Message,
    SamplingParams,
    TalkerDone,
    TalkerToVocoder,
    TextPart,
    VideoPart,
)


def make_request(media, kind, max_tokens=8, talker=SamplingParams(max_tokens=16)) -> ChatRequest:
    parts = {
        "text": lambda: [],
        "image": lambda: [ImagePart(media["image"])],
        "audio": lambda: [AudioPart(media["audio"])],
        "all": lambda: [ImagePart(media["image"]), AudioPart(media["audio"]), VideoPart(media["video"])],
    }[kind]()
    return ChatRequest(
        [Message("user", parts + [TextPart(f"Describe the {kind}, please.")])],
        sampling=SamplingParams(max_tokens=max_tokens),
        talker_sampling=talker,
        speak=True,
        use_audio_in_video=kind == "all",
    )


@pytest.fixture(scope="module")
def chain(tiny_qwen3):
    from omni.talker_qwen3 import Qwen3Talker
    from omni.thinker_qwen3 import Qwen3Thinker
    from omni.encoders import AudioEncoder, VisionEncoder
    from omni.serve.stages import TalkerStage, ThinkerStage

    m = tiny_qwen3.model
    talker = Qwen3Talker.from_model(m)
    return (
        VisionEncoder.for_tower(m.thinker.model.visual),
        AudioEncoder.for_tower(m.thinker.model.audio_tower),
        ThinkerStage(Qwen3Thinker.from_model(m, tiny_qwen3.processor.tokenizer)),
        TalkerStage(talker),
        talker,
    )


def run_all(tiny_qwen3, chain, reqs):
    """Each request through Thinker -> Talker; all at once (one engine each), in order of the list."""
    from omni.prompt import prepare_prompt
    from omni.encoders import encode_prompt

    vision, audio, thinker, talker, _ = chain
    inputs = []
    for r in reqs:
        prompt = prepare_prompt(tiny_qwen3.processor, r)
        inputs.append((r.generation, prompt, encode_prompt(prompt, vision, audio)))

    async def one(gen, prompt, media):
        return [x async for x in talker.run(gen, thinker.run(gen, prompt, media))]

    async def go():
        return await asyncio.gather(*[one(*x) for x in inputs])

    return asyncio.run(go())


def talker_done(items) -> TalkerDone:
    return next(x for x in items if isinstance(x, TalkerDone))


def test_seeded_sampling_equals_the_official_generate(tiny_qwen3, chain):
    from omni.reference import reference_generate

    req = make_request(
        {}, "text", talker=SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, max_tokens=16, seed=7)
    )
    (items,) = run_all(tiny_qwen3, chain, [req])
    ref = reference_generate(tiny_qwen3, req, seed=7)
    frames = talker_done(items).codes
    assert frames == ref.codec_ids and len(frames) == 15  # 16 talker steps: the last code 0 gets no frame
    greedy = talker_done(run_all(tiny_qwen3, chain, [make_request({}, "text")])[0]).codes
    assert frames[0][1:] != greedy[0][1:]  # the code predictor sampled too


def test_a_stop_id_ends_the_reply_as_in_the_official_generate(tiny_qwen3, chain, media):
    from omni.reference import reference_generate

    greedy = talker_done(run_all(tiny_qwen3, chain, [make_request(media, "image")])[0])
    assert greedy.finish_reason == "length" and len(greedy.codes) == 15
    stop = greedy.codes[5][0]  # codebook 0 of frame 5: the talker stops there, emitting no frame for it
    req = make_request(media, "image", talker=SamplingParams(max_tokens=16, stop_token_ids=(stop,)))
    (items,) = run_all(tiny_qwen3, chain, [req])
    done = talker_done(items)
    first = next(i for i, f in enumerate(greedy.codes) if f[0] == stop)
    assert (
        done.finish_reason == "stop"
        and done.codes == greedy.codes[:first] == reference_generate(tiny_qwen3, req).codec_ids
    )
    sent = [f for x in items if isinstance(x, TalkerToVocoder) for f in x.codes]
    assert sent == done.codes and [x for x in items if isinstance(x, TalkerToVocoder)][-1].last


def test_a_one_token_reply_says_nothing(tiny_qwen3, chain):
    """The official generate raises on it; the talker finishes with no frame."""
    (items,) = run_all(tiny_qwen3, chain, [make_request({}, "text", max_tokens=1)])
    assert talker_done(items).codes == []


def test_frames_of_concurrent_requests_batch_and_equal_solo(tiny_qwen3, chain, media):
    *_, talker = chain
    reqs = [
        make_request(media, k, max_tokens=6 + 2 * i, talker=SamplingParams(max_tokens=12 + 3 * i))
        for i, k in enumerate(["text", "image", "audio", "all"])
    ]
    solo = [talker_done(run_all(tiny_qwen3, chain, [dataclasses.replace(r)])[0]).codes for r in reqs]
    steps, runs = talker.engine.num_steps, talker.predictor_runs
    together = run_all(tiny_qwen3, chain, [dataclasses.replace(r) for r in reqs])
    assert [talker_done(x).codes for x in together] == solo
    frames = sum(len(s) for s in solo)
    assert talker.engine.num_steps - steps < 0.6 * frames and talker.predictor_runs - runs < 0.6 * frames
    assert talker.engine.max_rows_seen >= 3 and talker.predictor_max_batch >= 3
