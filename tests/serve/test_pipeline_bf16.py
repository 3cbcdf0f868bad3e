"""The whole pipeline in bfloat16 on the CPU (the dtype real weights are served in on a GPU), against the official
transformers path loaded in bfloat16 on the same checkpoint: what equality holds there.

Measured on tiny: for every input mix below the text ids and the Talker's codec ids equal the official bf16 path's
(each stage computes each row with the official ops: prefill alone, decode over a masked view of the slot cache);
the vocoder runs in float32 in both paths (the official one casts token2wav to float), so the waveform is held to the
streaming bound against offline decoding of the same codes. A longer reply or another checkpoint can flip a near-tied
argmax in bf16 where float32 does not: exactness in bf16 is per input, measured here, not a guarantee."""

import asyncio

import numpy as np
import pytest

from omni.reference import reference_generate
from omni.decoders import MIN_STREAM_SNR_DB, snr_db
from omni.serve.pipeline import Pipeline

from .test_pipeline import make_request


@pytest.fixture(scope="module")
def bf16_pipeline():
    p = Pipeline.from_pretrained("tiny", device="cpu", dtype="bfloat16")
    assert next(p.loaded.model.thinker.parameters()).dtype.is_floating_point
    assert str(next(p.loaded.model.thinker.parameters()).dtype) == "torch.bfloat16"
    return p


@pytest.mark.parametrize("kind", ["text", "image", "all"])
def test_bfloat16_pipeline_equals_the_official_bfloat16_path(bf16_pipeline, media, cookbook, kind, stop_codes):
    req = make_request(media, kind, speak=True)
    ref = reference_generate(bf16_pipeline.loaded, cookbook(req))  # the oracle's media: the cookbook's decoding
    out = asyncio.run(bf16_pipeline.run(req))
    assert out.token_ids == ref.token_ids and out.codec_ids == ref.codec_ids and out.codec_ids
    codes = [c for c in out.codec_ids if c not in stop_codes]
    offline = bf16_pipeline.vocoder.offline(codes, req.voice, seed=0)
    assert len(out.waveform) == len(ref.waveform) == 480 * len(codes)
    assert snr_db(offline, out.waveform) >= MIN_STREAM_SNR_DB
    assert np.abs(offline - ref.waveform).max() <= 1e-4
