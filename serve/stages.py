"""The generating stages as async streams: each consumes its upstream's items, passes through what is not for it,
and yields its own outputs as they come. In process, `Pipeline` chains them directly; on Ray, each generation
deployment runs one of them over its upstream deployment's handle stream (serve/cluster/deployments.py). No ray here.

    ThinkerStage:  the root: TextDelta, TalkerPrompt, ThinkerToTalker, ThinkerDone (omni.types.ThinkerItem)
    TalkerStage:   consumes TalkerPrompt (Qwen3TalkerPrompt) / ThinkerToTalker; adds TalkerToVocoder, TalkerDone
    VocoderStage:  consumes TalkerToVocoder; adds AudioChunk

`StageGroup` runs adjacent stages of one process, their hand-offs in process: all three in `Pipeline`, and on Ray the
stages a generation deployment hosts (ServeConfig.colocate). `batches` coalesces a stream into lists of what is
ready, one message per list where the stream crosses a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Optional, Protocol, cast

from omni.talker import Talker
from omni.thinker import Thinker
from omni.types import (
    AudioChunk,
    Generation,
    MediaEmbeddings,
    PromptLayout,
    Qwen3TalkerPrompt,
    TalkerPrompt,
    TalkerToVocoder,
    ThinkerItem,
    ThinkerToTalker,
)
from omni.decoders.loop import VocoderLoop

__all__ = ["merge_with_upstream", "batches", "ThinkerStage", "TalkerStage", "VocoderStage", "StageGroup"]

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


async def _pump(source: AsyncIterator, out: asyncio.Queue, filt: Optional[Callable[[object], bool]] = None) -> None:
    """Put the items of `source` that `filt` does not take into `out`, an error as _Failed, then _DONE."""
    try:
        async for item in source:
            if filt is None or not filt(item):
                out.put_nowait(item)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
        out.put_nowait(_Failed(exc))
    finally:
        out.put_nowait(_DONE)


async def merge_with_upstream(
    upstream: AsyncIterator, consume: Callable[[object], bool], own: AsyncIterator
) -> AsyncIterator:
    """Yield the items of `upstream` that `consume(item)` does not take, interleaved with the items of `own`, in
    arrival order, until both end. An error on either side is raised here; leaving early cancels both sides."""
    out: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(upstream, out, consume)), asyncio.ensure_future(_pump(own, out))]
    try:
        ended = 0
        while ended < 2:
            item = await out.get()
            if item is _DONE:
                ended += 1
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def batches(items: AsyncIterator) -> AsyncIterator[list]:
    """The items of `items`, in order, in lists: each list holds every item that arrived while the consumer was busy
    with the previous one (several steps, and the items of several requests' steps at once, per message where the
    consumer is another process). An error is raised after the items before it; leaving early cancels `items`."""
    out: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(_pump(items, out))
    try:
        while True:
            batch, item = [], await out.get()
            while item is not _DONE and not isinstance(item, _Failed):
                batch.append(item)
                if out.empty():
                    break
                item = out.get_nowait()
            if batch:
                yield batch
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class ThinkerStage:
    """The root of the chain: the continuous-batching Thinker."""

    def __init__(self, thinker: Thinker):
        self.thinker = thinker

    def run(self, gen: Generation, prompt: PromptLayout, media: MediaEmbeddings) -> AsyncIterator[ThinkerItem]:
        return self.thinker.generate(
            gen.request_id, prompt, media, gen.sampling, for_talker=gen.speak, forced_reply=gen.forced_reply
        )

    def stats(self) -> dict:
        return {**self.thinker.engine.stats(), **self.thinker.loop.loop_stats()}


class TalkerStage:
    """Codec tokens one Thinker step behind, step-batched across requests."""

    def __init__(self, talker: Talker):
        self.talker = talker

    def run(self, gen: Generation, upstream: AsyncIterator) -> AsyncIterator:
        seq, own = self.talker.generate(gen.request_id, gen.voice, gen.talker_sampling)

        def consume(item) -> bool:
            if isinstance(item, (TalkerPrompt, Qwen3TalkerPrompt, ThinkerToTalker)):
                seq.feed(item)
                self.talker.loop.wake()
                return True
            return False

        return merge_with_upstream(upstream, consume, own)

    def stats(self) -> dict:
        return {**self.talker.engine.stats(), **self.talker.loop.loop_stats()}


class VocoderStage:
    """PCM chunks as the codes arrive, the chunks of concurrent streams batched (omni.decoders.loop)."""

    def __init__(self, loop: VocoderLoop):
        self.loop = loop

    def run(self, gen: Generation, upstream: AsyncIterator) -> AsyncIterator:
        stream = self.loop.vocoder.open_stream(gen.voice, gen.vocoder_seed, max_codes=gen.talker_sampling.max_tokens)
        codes: asyncio.Queue = asyncio.Queue()

        def consume(item) -> bool:
            if isinstance(item, TalkerToVocoder):
                codes.put_nowait(item)
                return True
            return False

        async def code_items():
            while True:
                item = await codes.get()
                yield item
                if item.last:
                    return

        async def audio():
            async for pcm in self.loop.run(stream, code_items()):
                yield AudioChunk(pcm)

        return merge_with_upstream(upstream, consume, audio())

    def stats(self) -> dict:
        return {**self.loop.stats(), **self.loop.loop_stats()}


class _ChainStage(Protocol):
    """What StageGroup runs of a chain stage (TalkerStage, VocoderStage)."""

    def run(self, gen: Generation, upstream: AsyncIterator) -> AsyncIterator: ...

    def stats(self) -> dict: ...


class StageGroup:
    """Adjacent generating stages in one process, the hand-offs between them in process: optionally the Thinker (the
    root), then the stages of the speech chain it holds, in the chain's order (serve/compose.py's SPEECH_CHAIN)."""

    def __init__(self, root: Optional[ThinkerStage], chain: dict[str, object]):
        self.root = root
        self.chain = cast("dict[str, _ChainStage]", chain)  # TalkerStage / VocoderStage, by name

    @property
    def names(self) -> tuple[str, ...]:
        return (("thinker",) if self.root is not None else ()) + tuple(self.chain)

    def run(
        self,
        gen: Generation,
        upstream: Optional[AsyncIterator] = None,
        prompt: Optional[PromptLayout] = None,
        media: Optional[MediaEmbeddings] = None,
    ) -> AsyncIterator:
        """With the root: the Thinker on (prompt, media), else the upstream stream; then, for speech, each stage of
        the group over the stream before it."""
        items: AsyncIterator
        if self.root is not None:
            assert prompt is not None and media is not None, "the Thinker runs on (prompt, media)"
            items = self.root.run(gen, prompt, media)
        else:
            assert upstream is not None, "a group without the Thinker runs over its upstream"
            items = upstream
        if gen.speak:
            for stage in self.chain.values():
                items = stage.run(gen, items)
        return items

    def stats(self) -> dict[str, dict]:
        """Per stage of the group: its counters and loop accounting."""
        out = {"thinker": self.root.stats()} if self.root is not None else {}
        return {**out, **{name: stage.stats() for name, stage in self.chain.items()}}
