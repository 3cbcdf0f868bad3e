"""The speech endpoint's oracle (omni.reference `_teacher_forced_thinker`: the official Thinker fed a reply known in
advance, one forward) against the official free-running `generate`: on a reply the model wrote itself (greedy,
speech on), teacher-forcing that very reply must give the Talker the same inputs, so the same codec ids (Qwen2.5:
codes; Qwen3: frames of 16 codebooks) and the same speech. The free reply stops at max_tokens here (the random tiny
model rarely writes its end of turn), where the endpoint's ends with <|im_end|>: the layout of the hand-offs is the
same (the last reply id is never fed to the Thinker), so this checks every one of them."""

import numpy as np
import pytest

from omni.reference import reference_generate
from omni.types import ChatRequest, ImagePart, Message, SamplingParams, TextPart


def _free_then_forced(loaded, req):
    free = reference_generate(loaded, req)
    assert len(free.token_ids) >= 2 and free.codec_ids  # a reply of one token makes the official generate raise
    forced = reference_generate(loaded, req, forced_reply_ids=list(free.token_ids))
    return free, forced


@pytest.mark.parametrize("kind", ["text", "image"])
def test_teacher_forced_thinker_equals_free_running_generate(tiny, cookbook_media, kind):
    parts = [ImagePart(cookbook_media["image"])] if kind == "image" else []  # the image: media merged, TMRoPE positions
    req = ChatRequest(
        [Message("user", parts + [TextPart("Tell me a short story about a cat.")])],
        sampling=SamplingParams(max_tokens=12),
        talker_sampling=SamplingParams(max_tokens=48),
        speak=True,
        voice="Ethan",
    )
    free, forced = _free_then_forced(tiny, req)
    assert forced.token_ids == free.token_ids and forced.prompt_ids == free.prompt_ids
    assert forced.codec_ids == free.codec_ids and len(free.codec_ids) > 12
    assert np.array_equal(forced.waveform, free.waveform)  # measured: bit-identical on the CPU (max abs 0.0)


def test_teacher_forced_thinker_equals_free_running_generate_qwen3(tiny_qwen3):
    req = ChatRequest(
        [Message("user", "Tell me a short story about a cat.")],
        sampling=SamplingParams(max_tokens=12),
        talker_sampling=SamplingParams(max_tokens=30),
        speak=True,
        voice="Ethan",
    )
    free, forced = _free_then_forced(tiny_qwen3, req)
    assert forced.token_ids == free.token_ids and forced.prompt_ids == free.prompt_ids
    assert forced.codec_ids == free.codec_ids and len(free.codec_ids) > 4 and len(free.codec_ids[0]) == 16
    assert np.array_equal(forced.waveform, free.waveform)  # measured: bit-identical on the CPU (max abs 0.0)
