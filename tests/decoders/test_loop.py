"""The vocoder loop's schedule on the tiny vocoder: first chunks before later chunks of other streams, started streams
by deadline (when their audio sent so far runs out), an about-to-run-dry stream never left behind; and the order
changes when audio comes, not what it is (each stream's PCM equals its solo stream)."""

import asyncio
import time

import numpy as np
import pytest
import torch

from omni.types import TalkerToVocoder
from omni.decoders import Token2Wav, VocoderLoop

BATCH_TOL = 5e-5  # as tests/decoders/test_token2wav.py: batched vs solo kernels


def codes(n: int, seed: int) -> list[int]:
    return torch.randint(0, 8448, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def vocoder(tiny):
    return Token2Wav(tiny.model.token2wav, tiny.model.speaker_map)


def test_first_chunks_go_first_then_by_deadline(vocoder):
    loop = VocoderLoop(vocoder, urgent_s=0.25)
    started = [vocoder.open_stream("Chelsie", i) for i in range(3)]
    fresh = vocoder.open_stream("Ethan", 9)
    for i, s in enumerate(started):
        s.push(codes(60, i))  # a later chunk ready
        loop._streams[id(s)] = s
    fresh.push(codes(24, 9))  # its first chunk ready
    loop._streams[id(fresh)] = fresh
    now = time.perf_counter()
    loop._play_end = {id(started[0]): now + 2.0, id(started[1]): now + 0.1, id(started[2]): now + 1.0}
    # the first chunk first; with it only the stream whose audio runs out within urgent_s
    assert loop._next_work() == [fresh, started[1]]
    loop._play_end[id(fresh)] = now + 0.24
    # nothing fresh: everyone ready, earliest deadline first
    assert loop._next_work() == [started[1], fresh, started[2], started[0]]
    assert loop.first_chunk_steps == 1


def test_concurrent_streams_equal_their_solo_runs(vocoder):
    """Three streams that start one after another while the others run: every stream's PCM equals its solo stream
    (the schedule changes when audio comes, not what it is); the loop's accounting saw every step."""
    loop = VocoderLoop(vocoder)
    utterances = [(120, "Chelsie", 1), (96, "Ethan", 2), (72, "Chelsie", 3)]

    def solo(n, voice, seed):
        s = vocoder.open_stream(voice, seed)
        s.push(codes(n, seed), last=True)
        out = []
        while not s.finished:
            out += vocoder.step([s])[0]
        return np.concatenate(out)

    async def one(n, voice, seed, delay):
        await asyncio.sleep(delay)

        async def feed():
            c = codes(n, seed)
            for k in range(0, n, 4):  # the Talker's emit_every 4
                yield TalkerToVocoder(c[k : k + 4], last=k + 4 >= n)
                await asyncio.sleep(0.005)

        stream = vocoder.open_stream(voice, seed)
        return np.concatenate([pcm async for pcm in loop.run(stream, feed())])

    async def main():
        return await asyncio.gather(*[one(n, v, s, 0.3 * i) for i, (n, v, s) in enumerate(utterances)])

    got = asyncio.run(main())
    for (n, v, s), wav in zip(utterances, got):
        assert wav.shape == (n * 480,) and np.abs(wav - solo(n, v, s)).max() <= BATCH_TOL
    stats = loop.loop_stats()
    assert stats["steps"] == loop.num_calls and stats["queued"] >= stats["steps"] and stats["running"] == 0


def test_one_chunk_per_stream_per_step_gives_the_same_audio(vocoder):
    """A stream four chunks behind: with chunks_per_stream=1 it takes four steps, and the audio equals one step that
    runs all four (the chunks never depend on their grouping; only the batch kernels do, within BATCH_TOL)."""
    c = codes(150, 4)
    whole, split = vocoder.open_stream("Ethan", 4), vocoder.open_stream("Ethan", 4)
    whole.push(c[:140])
    split.push(c[:140])
    assert len(whole._windows()) == 4
    all_at_once = vocoder.step([whole])[0]
    one_by_one = []
    for _ in range(4):
        assert split.ready
        one_by_one += vocoder.step([split], chunks_per_stream=1)[0]
    assert not split.ready and len(one_by_one) == len(all_at_once) == 4
    assert np.abs(np.concatenate(one_by_one) - np.concatenate(all_at_once)).max() <= BATCH_TOL


@pytest.mark.parametrize("wait_s, first_step", [(0.3, 2), (0.0, 1)])
def test_a_first_chunk_waits_briefly_for_the_first_chunks_on_their_way(vocoder, wait_s, first_step):
    """Stream A's first chunk is ready while B's codes are still coming (B got 4 of its 24 first-chunk codes, the rest
    100 ms later): with first_chunk_wait_s the first step waits for B and serves both (one step costs about the same
    for one first chunk as for two); without it, A's step runs alone and B waits for all of it. Both streams' PCM is
    what it is either way."""
    loop = VocoderLoop(vocoder, first_chunk_wait_s=wait_s)
    served: list[int] = []
    step = loop._step

    def traced(streams):
        served.append(len(streams))
        return step(streams)

    loop._step = traced

    async def feed(c, parts):
        for delay, k0, k1, last in parts:
            await asyncio.sleep(delay)
            yield TalkerToVocoder(c[k0:k1], last=last)

    async def one(seed, parts):
        stream = vocoder.open_stream("Chelsie", seed)
        return np.concatenate([pcm async for pcm in loop.run(stream, feed(codes(48, seed), parts))])

    async def main():
        a = one(1, [(0.0, 0, 48, True)])
        b = one(2, [(0.0, 0, 4, False), (0.1, 4, 48, True)])
        return await asyncio.gather(a, b)

    wav_a, wav_b = asyncio.run(main())
    assert served[0] == first_step, served
    assert wav_a.shape == wav_b.shape == (48 * 480,)


def loop_trace(path, *args: str) -> str:
    """What tools/loop_trace.py prints for the step trace at `path`."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).parents[2] / "tools" / "loop_trace.py"
    run = subprocess.run([sys.executable, str(tool), str(path), *args], capture_output=True, text=True, check=True)
    return run.stdout


def test_step_trace_has_a_line_per_step_with_the_worker_threads_spend(vocoder, tmp_path, monkeypatch):
    """OMNI_LOOP_TRACE (omni/loop.py): one JSON line per step, the keys it served, what its thread spent; and
    tools/loop_trace.py reads it back. Without the variable, no file."""
    import json

    path = tmp_path / "steps.jsonl"

    async def speak(loop, seed):
        stream = vocoder.open_stream("Chelsie", seed)

        async def feed():
            yield TalkerToVocoder(codes(60, seed), last=True)

        return [pcm async for pcm in loop.run(stream, feed())]

    async def two(loop):
        return await asyncio.gather(speak(loop, 1), speak(loop, 2))

    untraced = VocoderLoop(vocoder)
    asyncio.run(two(untraced))
    assert not path.exists()
    monkeypatch.setenv("OMNI_LOOP_TRACE", str(path))
    loop = VocoderLoop(vocoder)
    asyncio.run(two(loop))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    stats = loop.loop_stats()
    assert len(lines) == stats["steps"] >= 2 and sum(x["keys"] for x in lines) == stats["step_items"]
    for x in lines:
        assert x["loop"] == loop.name and x["start"] <= x["end"] and x["keys"] >= 1
        assert x["cpu_s"] > 0 and x["minflt"] >= 0
    assert all(a["end"] <= b["start"] for a, b in zip(lines, lines[1:]))  # one worker thread: steps in turn
    summary = loop_trace(path)
    assert f"{loop.name}: {len(lines)} steps" in summary, summary


def test_step_trace_tool_cuts_the_first_level_up_to_its_first_audio(tmp_path):
    """tools/loop_trace.py --to-first-audio: a warm-up request's steps, then a level whose rows arrive over three
    Thinker steps, then a larger level; only the first level's steps before the vocoder's first step in it are
    summed, and its own row count is the one reported."""
    import json

    def step(loop, start, keys, seconds=0.01):
        return {"loop": loop, "start": start, "end": start + seconds, "keys": keys, "cpu_s": seconds / 2, "minflt": 0}

    warm_up = [step("thinker", 0.0, 1), step("thinker", 0.02, 1), step("vocoder", 0.05, 1)]
    level = [step("thinker", 5.0, 1), step("thinker", 5.02, 3), step("thinker", 5.04, 8), step("talker", 5.06, 8)]
    after = [step("vocoder", 5.5, 8, 0.2), step("thinker", 5.51, 8), step("talker", 5.52, 8)]
    larger = [step("thinker", 9.0, 2), step("thinker", 9.02, 16), step("vocoder", 9.5, 16)]
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in warm_up + level + after + larger))
    out = loop_trace(path, "--to-first-audio")
    first = "first audio step 0.50 s after the level's first Thinker step; the Thinker held all 8 rows from 0.04 s"
    assert first in out, out
    assert "thinker: 3 steps, 4.0 keys each, 0.03 s (10.0 ms each), on a CPU 50% of it" in out, out
    assert "talker: 1 steps" in out and "vocoder" not in out.split("\n", 1)[1], out
