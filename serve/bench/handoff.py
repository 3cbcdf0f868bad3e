"""Bytes that cross processes for one request on the Ray app, by layout: what the ingress and the generating
deployments send at their handle calls, counted as pickled bytes (what Ray serializes), from the objects the stages
really produce (the tiny pipeline, in process, its streams tapped at each stage's output).

    python -m omni.serve.bench.handoff [--model tiny] [--max-tokens 16] [--speech-tokens 60]

Per request (an image request and a video request, text + speech), per layout:
- encoder calls: each media item to its encoder (pixels / features) and its embeddings back;
- generate calls: what each hop of the chain is called with. `before`: (Generation, PreparedPrompt, MediaEmbeddings)
  at every hop, as the chain forwarded them until colocate and PromptLayout; now (Generation, PromptLayout, MediaRef)
  at every hop and the MediaEmbeddings once through the object store (put by the ingress, read by the Thinker's
  replica);
- streamed items: every item that leaves a process (the hand-offs between stages in other replicas, then what the
  last deployment sends the ingress); one message per item before, per list of the items ready at once now.
No Ray here: the layouts' process boundaries are modelled from serve/cluster/deployments.py's call structure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pickle
from collections.abc import AsyncIterator

import numpy as np

from omni.types import (
    TALKER_DEFAULT_SAMPLING,
    ChatRequest,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    Video,
    VideoPart,
)

__all__ = ["request_bytes", "main"]

LAYOUTS = {
    "split, before": (("thinker",), ("talker",), ("vocoder",)),
    "split": (("thinker",), ("talker",), ("vocoder",)),
    "colocated": (("thinker", "talker", "vocoder"),),
}
REF_BYTES = 64  # a pickled ObjectRef in a MediaRef: its id and owner address (~60 bytes)


def _size(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


async def _tap(items: AsyncIterator, seen: list) -> AsyncIterator:
    async for item in items:
        seen.append(item)
        yield item


async def _run_tapped(stages, gen, layout, media) -> dict[str, list]:
    """Every item out of each stage's stream (each passes its upstream's other items on)."""
    out: dict[str, list] = {"thinker": [], "talker": [], "vocoder": []}
    items = _tap(stages.root.run(gen, layout, media), out["thinker"])
    for name, stage in stages.chain.items():
        items = _tap(stage.run(gen, items), out[name])
    async for _ in items:
        pass
    return out


def _stream_bytes(out: dict[str, list], groups) -> tuple[int, int]:
    """(bytes, items) of the streamed items that leave a process: each group's output stream. Items, not messages:
    now a message is a list of the items ready at once (fewer messages under load, the same bytes)."""
    total = count = 0
    for group in groups:
        items = out[group[-1]]
        total += sum(_size(it) for it in items)
        count += len(items)
    return total, count


def request_bytes(pipeline, request: ChatRequest) -> dict[str, dict[str, int]]:
    """Per layout: {"encoder_calls", "generate_calls", "object_store", "streamed", "items", "total"} bytes."""
    prompt = asyncio.run(pipeline.stages.prepare(request))
    media = asyncio.run(pipeline.stages.encode(prompt))
    gen = request.generation
    out = asyncio.run(_run_tapped(pipeline.stages, gen, prompt.layout, media))
    items = [*prompt.images, *prompt.videos, *prompt.audios]
    embeds = [*media.images, *media.videos, *media.audios]
    encoder = sum(_size(it) for it in items) + sum(_size(e) for e in embeds)
    result = {}
    for name, groups in LAYOUTS.items():
        before = name.endswith("before")
        hop = _size((gen, prompt, media)) if before else _size((gen, prompt.layout)) + REF_BYTES
        store = 0 if before else _size(media)
        streamed, n_items = _stream_bytes(out, groups)
        generate = hop * len(groups)
        result[name] = {
            "encoder_calls": encoder,
            "generate_calls": generate,
            "object_store": store,
            "streamed": streamed,
            "items": n_items,
            "total": encoder + generate + store + streamed,
        }
    return result


def _requests(max_tokens: int, speech_tokens: int) -> dict[str, ChatRequest]:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
    video = Video(frames=rng.integers(0, 255, (20, 448, 448, 3), dtype=np.uint8), fps=2.0)
    talker = dataclasses.replace(TALKER_DEFAULT_SAMPLING, temperature=0.0, max_tokens=speech_tokens)

    def ask(part, q: str) -> ChatRequest:
        return ChatRequest(
            [Message("user", [part, TextPart(q)])],
            speak=True,
            sampling=SamplingParams(max_tokens=max_tokens),
            talker_sampling=talker,
        )

    return {
        "image 448x448": ask(ImagePart(image), "What is in the picture?"),
        "video 20 x 448x448": ask(VideoPart(video), "What happens in the video?"),
    }


def main(argv=None) -> int:
    from omni.serve.pipeline import Pipeline

    ap = argparse.ArgumentParser(prog="python -m omni.serve.bench.handoff", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--speech-tokens", type=int, default=60)
    a = ap.parse_args(argv)
    pipeline = Pipeline.from_pretrained(a.model)
    print("| request | layout | encoder calls | generate calls | object store | streamed (items) | total |")
    print("|---|---|---:|---:|---:|---:|---:|")
    kib = lambda n: f"{n / 1024:,.1f} KiB"  # noqa: E731
    for what, req in _requests(a.max_tokens, a.speech_tokens).items():
        for layout, b in request_bytes(pipeline, req).items():
            print(
                f"| {what} | {layout} | {kib(b['encoder_calls'])} | {kib(b['generate_calls'])} | "
                f"{kib(b['object_store'])} | {kib(b['streamed'])} ({b['items']}) | {kib(b['total'])} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
