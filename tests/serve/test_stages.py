"""serve/stages.py's `batches`: how a stream crosses a process (one message per list of the items ready at once)."""

import asyncio

import pytest

from omni.serve.stages import batches


def test_items_ready_together_cross_as_one_list_in_order():
    async def run():
        go, done = asyncio.Event(), asyncio.Event()

        async def items():
            yield 0  # alone: the consumer waits for it
            await go.wait()
            for i in range(1, 6):  # five at once, while the consumer is busy
                yield i
            done.set()

        out = []
        async for batch in batches(items()):
            out.append(batch)
            if len(out) == 1:
                go.set()
                await done.wait()  # the consumer busy: the producer runs to its end meanwhile
        return out

    out = asyncio.run(run())
    assert out == [[0], [1, 2, 3, 4, 5]]  # the five ready at once: one message


def test_an_error_comes_after_the_items_before_it_and_leaving_early_cancels():
    closed = []

    async def failing():
        yield "a"
        raise ValueError("boom")

    async def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def run():
        got = []
        with pytest.raises(ValueError, match="boom"):
            async for batch in batches(failing()):
                got += batch
        stream = batches(endless())
        first = await stream.__anext__()
        await stream.aclose()
        return got, first

    got, first = asyncio.run(run())
    assert got == ["a"] and first and closed == [True]
