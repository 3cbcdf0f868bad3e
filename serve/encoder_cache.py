"""The encoders' outputs, cached by the content hash of their input, so a conversation that is sent again (the demo's
resent history, a realtime session's next turn) does not run the vision / audio towers again for media they saw.

    cache = EncoderCache(max_bytes=256 * 2**20)
    media = await cache.encode(prompt, stages.encode)   # hits from the cache, misses through `stages.encode`

Key: what the tower reads, hashed (BLAKE2b-256): the item kind (image / video / audio), then the tensors' dtype, shape
and bytes (a vision item: pixel_values + grid_thw + merge_size; an audio item: its log-mel features, whose frame count
is its length). Value: the tower's output for that item, `(embeds [n_tokens, H], deepstack [n_levels, n_tokens, H]
or None)`, on the CPU as the encoders return it. Bounded in bytes of cached tensors, least recently used out first; an
item larger than the whole bound is not kept. It lives in the composition's process (the in-process pipeline, or the
Ray app's ingress replica): a hit means no encoder call, in process or to an encoder deployment. No ray here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Optional, Union, cast

import torch

from omni.types import AudioItem, MediaEmbeddings, PreparedPrompt, VisionItem

__all__ = ["EncoderCache", "item_key", "KINDS"]

KINDS = ("image", "video", "audio")  # MediaEmbeddings' lists, in the order the keys name them

Entry = tuple  # (embeds [n_tokens, H], deepstack [n_levels, n_tokens, H] or None)


def _feed(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def item_key(kind: str, item) -> bytes:
    """The content hash of one encoder input (VisionItem for image / video, AudioItem for audio)."""
    h = hashlib.blake2b(kind.encode(), digest_size=32)
    if isinstance(item, VisionItem):
        _feed(h, item.pixel_values)
        _feed(h, item.grid_thw)
        h.update(str(item.merge_size).encode())
    elif isinstance(item, AudioItem):
        _feed(h, item.features)  # [128, n_frames]: the frame count (the tower's length) is in the shape
    else:
        raise TypeError(f"no cache key for {type(item).__name__}")
    return h.digest()


def _nbytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry if t is not None)


class EncoderCache:
    """LRU of encoder outputs, bounded by `max_bytes` of tensors. Used from one event loop (the composition's);
    hashing runs in a worker thread. `stats()` is what /metrics exports."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0  # bytes of the cached tensors
        self.hits = {k: 0 for k in KINDS}  # items served from the cache
        self.misses = {k: 0 for k in KINDS}  # items that went to an encoder
        self.evictions = 0  # entries dropped to stay within max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Optional[Entry]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        size = _nbytes(entry)
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= _nbytes(old)
            self.evictions += 1

    def stats(self) -> dict:
        return {
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "evictions": self.evictions,
            "bytes": self.bytes,
            "entries": len(self._entries),
            "max_bytes": self.max_bytes,
        }

    async def encode(
        self, prompt: PreparedPrompt, encode: Callable[[PreparedPrompt], Awaitable[MediaEmbeddings]]
    ) -> MediaEmbeddings:
        """The prompt's media embeddings: cached items from here, the others (each distinct one once) through
        `encode` on a prompt holding only them; no `encode` call when every item is cached."""
        groups: dict[str, Sequence[Union[VisionItem, AudioItem]]] = {
            "image": prompt.images,
            "video": prompt.videos,
            "audio": prompt.audios,
        }
        if not any(groups.values()) or self.max_bytes == 0:
            return await encode(prompt)
        keys = await asyncio.to_thread(lambda: {k: [item_key(k, it) for it in items] for k, items in groups.items()})
        found: dict[bytes, Entry] = {}
        # per kind, distinct missing items in order
        todo: dict[str, dict[bytes, Union[VisionItem, AudioItem]]] = {k: {} for k in KINDS}
        for kind in KINDS:
            for key, item in zip(keys[kind], groups[kind]):
                entry = found.get(key) or self.get(key)
                if entry is not None:
                    found[key] = entry
                    self.hits[kind] += 1
                elif key in todo[kind]:
                    self.hits[kind] += 1  # the same item twice in one prompt: encoded once
                else:
                    todo[kind][key] = item
                    self.misses[kind] += 1
        if any(todo.values()):
            sub = dataclasses.replace(
                prompt,
                # each kind's items are its prompt list's: VisionItem for image / video, AudioItem for audio
                images=cast("list[VisionItem]", list(todo["image"].values())),
                videos=cast("list[VisionItem]", list(todo["video"].values())),
                audios=cast("list[AudioItem]", list(todo["audio"].values())),
            )
            fresh = await encode(sub)
            for kind, embeds, deep in (
                ("image", fresh.images, fresh.image_deepstack),
                ("video", fresh.videos, fresh.video_deepstack),
                ("audio", fresh.audios, []),
            ):
                for i, key in enumerate(todo[kind]):
                    entry = (embeds[i], deep[i] if deep else None)
                    found[key] = entry
                    self.put(key, entry)
        out = {k: [found[key] for key in keys[k]] for k in KINDS}
        return MediaEmbeddings(
            images=[e for e, _ in out["image"]],
            videos=[e for e, _ in out["video"]],
            audios=[e for e, _ in out["audio"]],
            image_deepstack=[d for _, d in out["image"] if d is not None],
            video_deepstack=[d for _, d in out["video"] if d is not None],
        )
