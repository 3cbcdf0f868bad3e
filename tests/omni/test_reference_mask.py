"""The Qwen2.5 oracle's `keep_talker_mask` patch against the official `generate` left alone (issue 20 item 1).

transformers' generate drops an all-ones attention mask, so a single unpadded request skips the Talker's masked branch
(codec pad/bos embeddings, M-RoPE positions); the reference path hands the mask back. Here the UNPATCHED official
`generate` runs a left-padded batch, where the mask is not all ones and nothing is dropped: every row, the padded one
and the unpadded longest one alike, gives the patched single-request oracle's text ids and codec ids, and its Talker
logits to float noise. The unpatched single request is the odd one out."""

import contextlib

import pytest
import torch

from omni.reference import _capture_talker_codes, generate_kwargs, reference_generate
from omni.reference_inputs import official_inputs
from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart

pytestmark = pytest.mark.slow  # ~15 s on 2 cores: three official runs with speech, one of them with media

LOGIT_TOL = 1e-5  # batched vs solo: batch-size-dependent matmul kernels, measured <= 1.5e-7
RECIPE_GAP = 1e-3  # unpatched vs patched, first Talker step: measured ~9e-3 on tiny


def _request(parts, text: str) -> ChatRequest:
    return ChatRequest(
        [Message("user", parts + [TextPart(text)])],
        sampling=SamplingParams(max_tokens=12),
        talker_sampling=SamplingParams(max_tokens=48),
        speak=True,
    )


@pytest.fixture(scope="module")
def requests_(cookbook_media):
    return [
        _request([ImagePart(cookbook_media["image"]), AudioPart(cookbook_media["audio"])], "What do you see and hear?"),
        _request([], "Hi."),
    ]


@contextlib.contextmanager
def _talker_logits(model, sink: list):
    """Record the Talker's last-position logits of every forward: sink gets [batch, vocab] per step."""
    handle = model.talker.register_forward_hook(lambda mod, args, out: sink.append(out.logits[:, -1].clone()))
    try:
        yield
    finally:
        handle.remove()


def _cut(codes: list[int], stops) -> list[int]:
    """A row's codes up to and including its first stop code (later ones are the batch's padding)."""
    for i, c in enumerate(codes):
        if c in stops:
            return codes[: i + 1]
    return codes


def _official(loaded, inputs: dict, request: ChatRequest):
    """The official generate, unpatched: (text ids per row, codec ids per row, Talker logits [batch, steps, vocab])."""
    model = loaded.model
    kw = generate_kwargs(model, request, has_pixels="pixel_values" in inputs)
    codes, logits = [], []
    torch.manual_seed(0)
    with torch.inference_mode(), _capture_talker_codes(model, codes), _talker_logits(model, logits):
        seqs, _ = model.generate(**inputs, **kw)
    stops = (model.talker.codec_pad_token, model.talker.codec_eos_token)
    return (
        seqs[:, inputs["input_ids"].shape[1] :].tolist(),
        [_cut(r, stops) for r in codes[0].tolist()],
        torch.stack(logits, 1),
    )


def _left_padded(rows: list[dict], pad_id: int) -> dict:
    """Several requests' processor inputs as one left-padded batch, as the processor pads: input_ids and
    attention_mask padded on the left, the media tensors (pixel values, grids, audio features) concatenated."""
    width = max(x["input_ids"].shape[1] for x in rows)
    pads = [width - x["input_ids"].shape[1] for x in rows]
    out = {
        "input_ids": torch.cat(
            [torch.cat([torch.full((1, p), pad_id), x["input_ids"]], 1) for p, x in zip(pads, rows)]
        ),
        "attention_mask": torch.cat(
            [torch.cat([torch.zeros(1, p, dtype=torch.long), x["attention_mask"]], 1) for p, x in zip(pads, rows)]
        ),
    }
    for key in sorted(set().union(*rows) - set(out)):
        out[key] = torch.cat([x[key] for x in rows if key in x])
    return out


def _oracle(loaded, request):
    logits = []
    with _talker_logits(loaded.model, logits):
        ref = reference_generate(loaded, request)
    return ref, torch.stack(logits, 1)[0]


@pytest.fixture(scope="module")
def oracles(tiny, requests_):
    return [_oracle(tiny, r) for r in requests_]


def test_unpatched_padded_batch_equals_patched_oracle(tiny, requests_, oracles):
    """Row 0 (image + audio, the longest: no padding of its own) and row 1 (text, left-padded) of one batch."""
    rows = [official_inputs(tiny.processor, r) for r in requests_]  # the oracle's own inputs
    batch = _left_padded(rows, tiny.processor.tokenizer.pad_token_id)
    assert batch["attention_mask"][0].all() and not batch["attention_mask"][1].all()
    texts, codes, logits = _official(tiny, batch, requests_[0])
    for i, (ref, ref_logits) in enumerate(oracles):
        assert texts[i][: len(ref.token_ids)] == ref.token_ids, i
        assert codes[i] == ref.codec_ids and len(ref.codec_ids) == 48, i
        n = min(len(ref_logits), logits.shape[1])
        assert (logits[i, :n] - ref_logits[:n]).abs().max() <= LOGIT_TOL, i


def test_single_request_with_a_leading_pad_equals_patched_oracle(tiny, requests_, oracles):
    """The smallest non-all-ones mask: the text request alone, one pad token in front."""
    x = official_inputs(tiny.processor, requests_[1])
    x = {
        "input_ids": torch.cat([torch.tensor([[tiny.processor.tokenizer.pad_token_id]]), x["input_ids"]], 1),
        "attention_mask": torch.cat([torch.zeros(1, 1, dtype=torch.long), x["attention_mask"]], 1),
    }
    assert x["attention_mask"][0].tolist()[:2] == [0, 1]
    ref, ref_logits = oracles[1]
    texts, codes, logits = _official(tiny, x, requests_[1])
    assert texts[0] == ref.token_ids and codes[0] == ref.codec_ids
    assert (logits[0] - ref_logits).abs().max() <= LOGIT_TOL


def test_unpatched_single_request_skips_the_recipe(tiny, requests_, oracles):
    """Alone and unpadded, the official generate drops the mask: the Talker's logits differ from the first step, and
    the greedy codes part a few dozen steps in (the tiny Talker's argmax margins are wide)."""
    ref, ref_logits = oracles[1]
    texts, codes, logits = _official(tiny, official_inputs(tiny.processor, requests_[1]), requests_[1])
    assert texts[0] == ref.token_ids  # the Thinker is not concerned
    assert (logits[0, 0] - ref_logits[0]).abs().max() > RECIPE_GAP
    assert codes[0] != ref.codec_ids
