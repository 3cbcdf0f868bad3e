"""Decoded media of inline payloads, kept by the payload's hash: a chat client resends a conversation's earlier images,
audio and video with every turn (as data: URIs or base64 `input_audio`), and decoding them again (PNG, WAV, MP4 from
base64, the resize and resampling of omni.encoders.media) is the costliest part of turning a request into a prompt,
on the same cores as the model when the server is small. One cache per server (its media limits never change), least
recently used out first within `max_bytes` (config key `media_cache_bytes`; 0 turns it off).

Only inline payloads are cached: their bytes are their content. A URL or a local path may change behind the same
name, so those are decoded every time. A payload that fails to decode is not cached (it fails again, the same way).
The decoded objects are shared between the requests that hit them and are only read downstream (the processor
resizes and normalises into new arrays).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
from PIL import Image

from omni.types import Video

__all__ = ["MediaCache", "is_inline", "decoded_bytes"]

T = TypeVar("T")


def is_inline(source: str) -> bool:
    """A data: URI: the payload is the content (a URL or a path only names it)."""
    return source.startswith("data:")


def decoded_bytes(value) -> int:
    """Memory held by a decoded item (what the bound counts)."""
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Video):
        return value.frames.nbytes + (value.audio.nbytes if value.audio is not None else 0)
    raise TypeError(f"not a decoded media item: {type(value).__name__}")


class MediaCache:
    """kind + decode parameters + the payload's hash -> the decoded item (PIL image, audio samples, Video)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()  # conversions run in worker threads

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, payload: str | bytes, params: Hashable, decode: Callable[[], T]) -> T:
        """The decoded item of `payload` (a data: URI or raw bytes), decoding it on a miss; `params` are what else
        shapes the result (a video's frame count, its audio track)."""
        if self.max_bytes <= 0:
            return decode()
        data = payload.encode() if isinstance(payload, str) else payload
        key = (kind, params, hashlib.blake2b(data, digest_size=20).digest())
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit[0]  # type: ignore[return-value]
            self.misses += 1
        value = decode()  # outside the lock: two requests for one new payload both decode it, nobody waits
        size = decoded_bytes(value)
        if size <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = (value, size)
                    self.bytes += size
                    while self.bytes > self.max_bytes:
                        _, (_, freed) = self._items.popitem(last=False)
                        self.bytes -= freed
                        self.evictions += 1
        return value
