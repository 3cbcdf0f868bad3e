"""The generation deployments' classes in this process, chained as build_app chains them for each `colocate` layout,
their handles replaced by in-process ones that pickle what crosses (as Ray does): every layout gives the pipeline's
text ids and codec ids. The real Serve app runs both layouts in test_app.py (one deployment per stage) and
test_two_nodes.py / test_qwen3_app.py (tiny.yaml: the three in one replica)."""

import asyncio
import dataclasses
import pickle

import pytest

from omni.types import TALKER_DEFAULT_SAMPLING, ChatRequest, ImagePart, Message, SamplingParams, TextPart
from omni.serve.cluster.deployments import GenerationDeployment, group_options
from omni.serve.compose import collect, finish
from omni.serve.config import ServeConfig


class _Stream:
    """What `handle.options(stream=True).generate.remote(...)` returns: an async iterator with cancel()."""

    def __init__(self, agen, sent: list):
        self.agen, self.sent = agen, sent

    def __aiter__(self):
        return self

    async def __anext__(self):
        batch = await self.agen.__anext__()
        self.sent.append(len(pickle.dumps(batch)))
        return pickle.loads(pickle.dumps(batch))

    def cancel(self):
        asyncio.ensure_future(self.agen.aclose())


class _Handle:
    """An in-process stand-in for a DeploymentHandle: the call's arguments and each streamed list are pickled."""

    def __init__(self, target: GenerationDeployment, sent: list):
        self.target, self.sent = target, sent

    def options(self, stream: bool = False):
        return self

    @property
    def generate(self):
        return self

    def remote(self, *args):
        self.sent.append(len(pickle.dumps(args)))
        return _Stream(self.target.generate(*pickle.loads(pickle.dumps(args))), self.sent)


@pytest.fixture(scope="module")
def request_(media):
    return ChatRequest(
        [Message("user", [ImagePart(media["image"]), TextPart("Describe it aloud.")])],
        sampling=SamplingParams(max_tokens=10),
        speak=True,
        voice="Ethan",
        talker_sampling=dataclasses.replace(TALKER_DEFAULT_SAMPLING, temperature=0.0, max_tokens=60),
    )


@pytest.mark.parametrize("colocate", ["none", "thinker+talker", "talker+vocoder", "thinker+talker+vocoder"])
def test_every_layout_gives_the_pipelines_ids(pipeline, request_, colocate):
    cfg = ServeConfig(model="tiny", colocate=colocate)
    sent: list = []
    head = None
    for group in cfg.generation_groups:
        dep = GenerationDeployment("tiny", cfg, group, group_options(cfg, group), head)
        head = _Handle(dep, sent)
    ours = asyncio.run(pipeline.run(request_))

    async def through_the_chain():
        prompt = await pipeline.stages.prepare(request_)
        media = await pipeline.stages.encode(prompt)
        stream = head.options(stream=True).generate.remote(request_.generation, prompt.layout, media)

        async def items():
            async for batch in stream:
                for item in batch:
                    yield item

        return await collect(finish(items(), prompt_tokens=int(prompt.input_ids.shape[0])))

    out = asyncio.run(through_the_chain())
    assert out.token_ids == ours.token_ids and out.codec_ids == ours.codec_ids and len(out.codec_ids) > 12
    assert out.waveform.shape == ours.waveform.shape
