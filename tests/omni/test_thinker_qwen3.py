"""Qwen3-Omni's encoders (vision with deepstack, audio) and MoE Thinker on the shared engine, against the official
transformers code on the tiny checkpoint with real media: encoder outputs equal the thinker's own encoder calls,
text ids equal the official generate for every input mix (greedy and seeded sampling), prefill logits equal the
official forward's, and concurrent requests batch in one engine while each gets its solo tokens."""

import asyncio
import dataclasses

import pytest
import torch

from omni.types import (
    AudioPart,
    ChatRequest,
    ImagePart,
    Message,
    Qwen3TalkerPrompt,
    SamplingParams,
    TextPart,
    ThinkerDone,
    ThinkerToTalker,
    VideoPart,
)

KINDS = ["text", "image", "audio", "video", "video+audio", "all"]


def make_request(media, kind: str, max_tokens: int = 12, **kw) -> ChatRequest:
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
        use_audio_in_video=kind in ("video+audio", "all"),
        **kw,
    )


@pytest.fixture(scope="module")
def stages(tiny_qwen3):
    from omni.thinker_qwen3 import Qwen3Thinker
    from omni.encoders import AudioEncoder, VisionEncoder
    from omni.encoders.qwen3 import Qwen3AudioEncoder, Qwen3VisionEncoder

    m = tiny_qwen3.model
    vision, audio = VisionEncoder.for_tower(m.thinker.model.visual), AudioEncoder.for_tower(m.thinker.model.audio_tower)
    assert isinstance(vision, Qwen3VisionEncoder) and isinstance(audio, Qwen3AudioEncoder)
    return vision, audio, Qwen3Thinker.from_model(m, tiny_qwen3.processor.tokenizer)


def generate(tiny_qwen3, stages, req, for_talker=False):
    from omni.prompt import prepare_prompt
    from omni.encoders import encode_prompt

    vision, audio, thinker = stages
    prompt = prepare_prompt(tiny_qwen3.processor, req)
    media = encode_prompt(prompt, vision, audio)

    async def go():
        return [x async for x in thinker.generate(req.request_id, prompt, media, req.sampling, for_talker)]

    return asyncio.run(go())


def done(items) -> ThinkerDone:
    return next(x for x in items if isinstance(x, ThinkerDone))


def test_encoders_equal_the_thinkers_own_calls(tiny_qwen3, stages, media):
    from omni.prompt import prepare_prompt, processor_inputs

    vision, audio, _ = stages
    req = make_request(media, "all")
    x = processor_inputs(tiny_qwen3.processor, req, fast_audio=True)
    prompt = prepare_prompt(tiny_qwen3.processor, req)
    tm = tiny_qwen3.model.thinker.model
    with torch.no_grad():
        for kind, items, official in (
            ("image", prompt.images, tm.get_image_features(x["pixel_values"], x["image_grid_thw"])),
            ("video", prompt.videos, tm.get_video_features(x["pixel_values_videos"], x["video_grid_thw"])),
        ):
            ((emb, deep),) = vision.encode_with_deepstack(items)
            assert torch.equal(emb, official.pooler_output[0]), kind
            assert deep.shape[0] == 2 and all(torch.equal(deep[i], official.deepstack_features[i][0]) for i in range(2))
        official = tm.get_audio_features(x["input_features"], x["feature_attention_mask"]).last_hidden_state
    ours = torch.cat(audio.encode(prompt.audios))  # the audio part and the video's track, one forward
    assert ours.shape == official.shape and (ours - official).abs().max() <= 1e-6
    solo = [audio.encode([a])[0] for a in prompt.audios] + [
        vision.encode_with_deepstack([v])[0][1] for v in prompt.images + prompt.videos
    ]
    batched = audio.encode(prompt.audios) + [d for _, d in vision.encode_with_deepstack(prompt.images + prompt.videos)]
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(solo, batched))  # an item is independent of its batch


@pytest.mark.parametrize("kind", KINDS)
def test_text_ids_equal_the_official_generate(tiny_qwen3, stages, media, kind):
    from omni.reference import reference_generate

    req = make_request(media, kind)
    assert done(generate(tiny_qwen3, stages, req)).token_ids == reference_generate(tiny_qwen3, req).token_ids


def test_prefill_logits_equal_the_official_forward_and_deepstack_matters(tiny_qwen3, stages, media):
    from omni.prompt import processor_inputs

    _, _, thinker = stages
    req = make_request(media, "all", max_tokens=1)
    seen = []
    head = thinker.engine.model.head
    thinker.engine.model.head = lambda h: seen.append(head(h)) or seen[-1]
    try:
        generate(tiny_qwen3, stages, req)
        x = processor_inputs(tiny_qwen3.processor, req, fast_audio=True)
        with torch.no_grad():
            official = tiny_qwen3.model.thinker(**x, use_audio_in_video=True).logits[0, -1]
            stack = tiny_qwen3.model.thinker.model.language_model._deepstack_process
            tiny_qwen3.model.thinker.model.language_model._deepstack_process = lambda h, m, e: h
            try:
                without = tiny_qwen3.model.thinker(**x, use_audio_in_video=True).logits[0, -1]
            finally:
                tiny_qwen3.model.thinker.model.language_model._deepstack_process = stack
    finally:
        thinker.engine.model.head = head
    assert (seen[0][0] - official).abs().max() <= 1e-5
    assert (without - official).abs().max() > 1e-4  # the deepstack features change what the Thinker computes


def test_seeded_sampling_equals_the_official_generate(tiny_qwen3, stages, media):
    from omni.reference import reference_generate

    req = make_request(media, "image")
    req.sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=12, seed=3)
    ours = done(generate(tiny_qwen3, stages, req)).token_ids
    assert ours == reference_generate(tiny_qwen3, req).token_ids
    assert ours != done(generate(tiny_qwen3, stages, make_request(media, "image"))).token_ids  # it did sample


def test_talker_hand_off_follows_the_official_recipe(tiny_qwen3, stages, media):
    """The user turns only (system skipped), media rows from the accept layer, then e(g_k) as each token is sampled."""
    tok = tiny_qwen3.processor.tokenizer
    items = generate(tiny_qwen3, stages, make_request(media, "all", max_tokens=5), for_talker=True)
    prompt = next(x for x in items if isinstance(x, Qwen3TalkerPrompt))
    ids = prompt.user_ids.tolist()
    assert tok.decode(ids[:2]) == "<|im_start|>user" and "You are Qwen" not in tok.decode(ids)
    assert int(prompt.user_media.sum()) == sum(i in (384 + 3, 384 + 12, 384 + 13) for i in ids)  # AUDIO/IMAGE/VIDEO
    assert prompt.assistant_embeds.shape[0] == 3  # <|im_start|>assistant\n
    hand = [x for x in items if isinstance(x, ThinkerToTalker)]
    assert [h.index for h in hand] == list(range(5)) and hand[-1].last and hand[-1].reply is None
    embed = tiny_qwen3.model.thinker.get_input_embeddings()
    assert all(torch.equal(h.reply, embed.weight[h.token_id]) for h in hand[:-1])
    assert items.index(prompt) < items.index(hand[0])


def test_concurrent_requests_batch_and_equal_solo(tiny_qwen3, stages, media):
    from omni.prompt import prepare_prompt
    from omni.encoders import encode_prompt

    vision, audio, thinker = stages
    reqs = [make_request(media, k, max_tokens=10 + 3 * i) for i, k in enumerate(["text", "image", "audio", "all"])]
    prepared = [(r, prepare_prompt(tiny_qwen3.processor, r)) for r in reqs]
    prepared = [(r, p, encode_prompt(p, vision, audio)) for r, p in prepared]
    solo = [done(generate(tiny_qwen3, stages, dataclasses.replace(r))).token_ids for r in reqs]
    steps0 = thinker.engine.num_steps

    async def together():
        async def one(r, p, m):
            return [x async for x in thinker.generate(r.request_id, p, m, r.sampling)]

        return await asyncio.gather(*[one(*x) for x in prepared])

    outs = asyncio.run(together())
    assert [done(o).token_ids for o in outs] == solo
    assert thinker.engine.num_steps - steps0 < 0.6 * sum(len(s) for s in solo)
    assert thinker.engine.max_rows_seen >= 3
