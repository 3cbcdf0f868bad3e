"""A normal run prints no warning from transformers in the middle of the streamed answer (it once printed the
Talker's "`past_key_values` is deprecated ... Use `cache` instead" between text deltas)."""

import asyncio
import logging
import warnings

from .test_pipeline import make_request


def test_a_speech_request_warns_nothing(pipeline, media, caplog):
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = asyncio.run(pipeline.run(make_request(media, "all", speak=True)))
    assert out.codec_ids
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "deprecat" in m.lower() or "cache" in m.lower()], messages
