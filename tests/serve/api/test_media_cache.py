"""The decoded-media cache where requests are converted (serve/api/media_cache.py): a conversation's resent inline
media (data: URIs, base64 input_audio) is decoded once, and what a hit gives equals a fresh decode; other parameters,
URLs and paths, failures and the byte bound each miss, decode again or evict as they should."""

import base64

import numpy as np
import pytest
from PIL import Image

from omni.types import InvalidRequest
from omni.encoders.media import MediaPolicy
from omni.serve.api.convert import ConvertOptions, to_chat_request
from omni.serve.api.media_cache import MediaCache, decoded_bytes
from omni.serve.api.protocol import ChatCompletionRequest
from omni.serve.bench.http import media_parts


@pytest.fixture(scope="module")
def parts():
    return media_parts(("image", "audio", "video"))


def convert(content, cache=None, **opts):
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": content}])
    msg = to_chat_request(req, "id", ConvertOptions(media_cache=cache, **opts)).messages[0]
    return [getattr(p, name) for p in msg.content for name in ("image", "audio", "video") if hasattr(p, name)]


def same(a, b) -> bool:
    if isinstance(a, Image.Image):
        return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a.fps == b.fps and np.array_equal(a.frames, b.frames) and (a.audio is None) == (b.audio is None)


def test_resent_media_is_decoded_once_and_a_hit_equals_a_fresh_decode(parts):
    content = [parts["image"], parts["audio"], parts["video"], {"type": "text", "text": "and now?"}]
    cache = MediaCache(256 * 2**20)
    first = convert(content, cache)
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 3)
    again = convert(content, cache)  # the next turn resends them
    assert (cache.misses, cache.hits) == (3, 3)
    assert all(a is b for a, b in zip(first, again))  # no decode: the same objects
    fresh = convert(content)  # no cache at all
    assert len(fresh) == 3 and all(same(a, b) for a, b in zip(again, fresh))
    assert cache.bytes == sum(decoded_bytes(x) for x in first) > 0


def test_other_parameters_urls_and_failures_are_not_served_from_the_cache(parts, tmp_path):
    cache = MediaCache(256 * 2**20)
    video = parts["video"]
    convert([video], cache)
    six = {"type": "video_url", "video_url": {**video["video_url"], "num_frames": 6}}
    [v6] = convert([six], cache)  # another frame count: another item
    assert cache.misses == 2 and v6.frames.shape[0] == 6

    png = base64.b64decode(parts["image"]["image_url"]["url"].partition(",")[2])
    path = tmp_path / "x.png"
    path.write_bytes(png)
    local = {"type": "image_url", "image_url": {"url": str(path)}}
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))
    for _ in range(2):  # a path may change behind its name: decoded every time, never kept
        convert([local], cache, media_policy=policy)
    assert cache.misses == 2 and cache.hits == 0 and len(cache) == 2

    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}}
    for _ in range(2):  # fails the same way each time, nothing kept
        with pytest.raises(InvalidRequest, match="messages\\[0\\].content\\[0\\]"):
            convert([bad], cache)
    assert len(cache) == 2


def test_the_byte_bound_evicts_the_least_recently_used_and_zero_turns_it_off():
    decodes = []

    def decoder(n):
        def decode():
            decodes.append(n)
            return np.zeros(n, dtype=np.uint8)

        return decode

    cache = MediaCache(250)
    cache.get("audio", b"a", None, decoder(100))
    cache.get("audio", b"b", None, decoder(100))
    cache.get("audio", b"a", None, decoder(100))  # a hit: a is now the most recent
    cache.get("audio", b"c", None, decoder(100))  # 300 > 250: b goes
    assert (cache.bytes, cache.evictions, len(cache)) == (200, 1, 2)
    cache.get("audio", b"a", None, decoder(100))
    cache.get("audio", b"b", None, decoder(100))  # decoded again
    assert decodes == [100, 100, 100, 100]
    for _ in range(2):  # larger than the bound: returned, never kept
        assert len(cache.get("audio", b"big", None, decoder(300))) == 300
    assert (cache.bytes, len(cache), decodes[-2:]) == (200, 2, [300, 300])

    off = MediaCache(0)
    for _ in range(2):
        off.get("audio", b"a", None, decoder(1))
    assert len(off) == 0 and off.hits == off.misses == 0 and decodes[-2:] == [1, 1]
