"""The decode engine and the Thinker on it: batched rows equal solo rows, requests join mid-run, sampling with a
per-request generator equals the official sampled generate, stop ids and max tokens."""

import asyncio

import pytest
import torch

from omni.engine import EngineConfig
from omni.prompt import prepare_prompt
from omni.thinker import Thinker, ThinkerDone
from omni.types import ChatRequest, MediaEmbeddings, Message, SamplingParams, TextDelta

PROMPTS = [
    "Hello, how are you today?",
    "What is shown in the image?",
    "Describe the audio clip and the video.",
    "Über naïve café 你好",
]


def _prompt(tiny, text):
    return prepare_prompt(tiny.processor, ChatRequest([Message("user", text)]))


def _official(tiny, text, sampling: SamplingParams, seed=0):
    x = tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": text}]}], add_generation_prompt=True, tokenize=False
    )
    inputs = tiny.processor(text=[x], return_tensors="pt")
    kw = dict(max_new_tokens=sampling.max_tokens, do_sample=not sampling.greedy)
    if not sampling.greedy:
        kw.update(temperature=sampling.temperature, top_k=max(sampling.top_k, 0), top_p=sampling.top_p)
    if sampling.repetition_penalty != 1.0:
        kw["repetition_penalty"] = sampling.repetition_penalty
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = tiny.model.thinker.generate(**inputs, **kw)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


async def _generate(thinker, prompt, sampling, delay=0.0):
    await asyncio.sleep(delay)
    ids, text = None, ""
    async for ev in thinker.generate("r", prompt, MediaEmbeddings(), sampling):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, ThinkerDone):
            ids = ev.token_ids
    return ids, text


@pytest.fixture(scope="module")
def thinker(tiny):
    return Thinker(tiny.model.thinker, tiny.processor.tokenizer, EngineConfig(max_num_seqs=3))


def test_batched_and_joining_rows_equal_official(tiny, thinker):
    samplings = [SamplingParams(max_tokens=n) for n in (9, 20, 14, 5)]
    samplings[1] = SamplingParams(max_tokens=20, repetition_penalty=1.3)

    async def go():  # staggered arrivals; max_num_seqs=3 makes the 4th wait for a free slot
        return await asyncio.gather(
            *[
                _generate(thinker, _prompt(tiny, p), s, delay=0.01 * i)
                for i, (p, s) in enumerate(zip(PROMPTS, samplings))
            ]
        )

    steps0 = thinker.engine.num_steps
    results = asyncio.run(go())
    for (ids, text), p, s in zip(results, PROMPTS, samplings):
        ref = _official(tiny, p, s)
        assert ids == ref
        assert text == tiny.processor.tokenizer.decode(ref, skip_special_tokens=True)
    assert thinker.engine.num_steps - steps0 < sum(s.max_tokens for s in samplings)
    assert thinker.engine.max_rows_seen == 3 and thinker.engine.num_running == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_sampling_equals_official(tiny, thinker, seed):
    """Text-only: the official sampled generate draws from the global RNG seeded with `seed`; our request's own
    generator with the same seed draws the same numbers, also when batched with another request."""
    s = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=12, seed=seed)
    other = SamplingParams(temperature=1.3, max_tokens=12, seed=99)

    async def go():
        return await asyncio.gather(
            _generate(thinker, _prompt(tiny, PROMPTS[0]), s), _generate(thinker, _prompt(tiny, PROMPTS[1]), other)
        )

    (ids, _), _ = asyncio.run(go())
    assert ids == _official(tiny, PROMPTS[0], s, seed=seed)


def test_stop_token_ids_end_generation(tiny, thinker):
    full, _ = asyncio.run(_generate(thinker, _prompt(tiny, PROMPTS[0]), SamplingParams(max_tokens=12)))
    stop = full[4]
    k = full.index(stop)
    ids, _ = asyncio.run(
        _generate(thinker, _prompt(tiny, PROMPTS[0]), SamplingParams(max_tokens=12, stop_token_ids=(stop,)))
    )
    assert ids == full[: k + 1]  # the stop id is kept, as with EOS


def test_context_limit(tiny):
    """Prompt + max_tokens past the context is refused by the check the composition runs where a request enters
    (omni.serve.compose.prepare_checked); the Thinker trusts what it is given."""
    from omni.thinker import check_context
    from omni.types import InvalidRequest

    prompt = _prompt(tiny, PROMPTS[0])
    with pytest.raises(InvalidRequest, match="exceeds the model's context of 64"):
        check_context(int(prompt.input_ids.shape[0]), SamplingParams(max_tokens=40), 64)
    check_context(int(prompt.input_ids.shape[0]), SamplingParams(max_tokens=64 - prompt.input_ids.shape[0]), 64)


def test_cache_compaction_keeps_rows_exact(tiny):
    """A tiny dead-column threshold compacts the batched cache nearly every step; tokens stay exact."""
    th = Thinker(tiny.model.thinker, tiny.processor.tokenizer, EngineConfig(max_dead_columns=1))

    async def go():
        return await asyncio.gather(
            *[_generate(th, _prompt(tiny, p), SamplingParams(max_tokens=4 + 4 * i)) for i, p in enumerate(PROMPTS[:3])]
        )

    for (ids, _), p, n in zip(asyncio.run(go()), PROMPTS, (4, 8, 12)):
        assert ids == _official(tiny, p, SamplingParams(max_tokens=n))


def test_a_failing_prefill_fails_only_its_request(tiny, thinker):
    """A request whose media embeddings do not fit its placeholders gets an error; a concurrent one is unharmed."""
    from omni.types import InvalidRequest

    good = _prompt(tiny, PROMPTS[0])
    bad = _prompt(tiny, PROMPTS[1])
    slots = torch.tensor([tiny.model.config.thinker_config.image_token_id] * 2)  # 2 image slots
    bad.input_ids = torch.cat([bad.input_ids[:3], slots, bad.input_ids[3:]])

    async def go():
        return await asyncio.gather(
            _generate(thinker, good, SamplingParams(max_tokens=8)),
            _generate(thinker, bad, SamplingParams(max_tokens=8)),
            return_exceptions=True,
        )

    ok, err = asyncio.run(go())
    assert isinstance(err, InvalidRequest) and "placeholder" in str(err)
    assert ok[0] == _official(tiny, PROMPTS[0], SamplingParams(max_tokens=8))
    assert thinker.engine.num_running == 0


# ---------------------------------------------------------------------------------------------------- prefill budget
def _steps_with_arrivals(tiny, config: EngineConfig):
    """Drives an engine step by step: one request decoding, then three arrivals at once. -> (the running request's
    new tokens per step while the arrivals prefill, prompt tokens prefilled per step, every request's ids)."""
    from omni.thinker import ThinkerSequence

    th = Thinker(tiny.model.thinker, tiny.processor.tokenizer, config)

    def mk(text, n):
        return ThinkerSequence(
            th, text, _prompt(tiny, text), MediaEmbeddings(), SamplingParams(max_tokens=n), for_talker=False
        )

    running = mk(PROMPTS[0], 60)
    th.engine.add(running)
    while len(running.tokens) < 2:  # prefilled (in chunks or not) and decoding
        th.engine.step()
    arrivals = [mk(p, 6) for p in PROMPTS[1:]]
    for s in arrivals:
        th.engine.add(s)
    gained, prefilled = [], []
    while any(not s.finished for s in arrivals):
        before = len(running.tokens)
        th.engine.max_prefill_tokens_seen = 0
        th.engine.step()
        if not running.finished:
            gained.append(len(running.tokens) - before)
        prefilled.append(th.engine.max_prefill_tokens_seen)
    while not running.finished:
        th.engine.step()
    return gained, prefilled, [s.tokens for s in [running] + arrivals]


def test_prefill_budget_and_chunks_keep_decoding_between_arrivals_and_tokens_exact(tiny):
    """Three prompts arriving at once: with no budget they prefill in one step; with max_prefill_tokens each step
    prefills at most its budget (a whole prompt, or a chunk of one with prefill_chunk_tokens) and the running request
    still gets one token per step; every request's ids equal the official generate's."""
    lengths = [int(_prompt(tiny, p).input_ids.shape[0]) for p in PROMPTS[1:]]
    refs = [_official(tiny, PROMPTS[0], SamplingParams(max_tokens=60))] + [
        _official(tiny, p, SamplingParams(max_tokens=6)) for p in PROMPTS[1:]
    ]

    gained, prefilled, ids = _steps_with_arrivals(tiny, EngineConfig(max_prefill_tokens=0))
    assert prefilled[0] == sum(lengths) and ids == refs  # all three in the first step, before its decode

    gained, prefilled, ids = _steps_with_arrivals(tiny, EngineConfig(max_prefill_tokens=max(lengths)))
    assert prefilled[:3] == lengths and ids == refs  # one whole prompt per step (they do not fit two at once)
    assert all(g == 1 for g in gained)

    chunk = 16
    gained, prefilled, ids = _steps_with_arrivals(
        tiny, EngineConfig(max_prefill_tokens=chunk, prefill_chunk_tokens=chunk)
    )
    assert max(prefilled) == chunk and len([p for p in prefilled if p]) >= sum(lengths) // chunk
    assert len(gained) >= sum(lengths) // chunk and all(g == 1 for g in gained)  # a decode between two chunks
    assert ids == refs  # chunked attention over the earlier chunks' cache: the same tokens


def test_engine_config_refuses_negative_prefill_limits():
    with pytest.raises(ValueError, match="max_prefill_tokens and prefill_chunk_tokens"):
        EngineConfig(prefill_chunk_tokens=-1)


def test_no_batch_timer_while_a_running_row_is_urgent():
    """batch_wait_s holds a step for rows still waiting on their input, unless some row is urgent (its first output
    downstream pending: the Talker before the vocoder's first window). The longest batch_wait_s (1 s) and no clock: the
    non-urgent gather is still waiting after the loop has run everything else and ends when the input comes (within a
    generous 60 s deadline); the urgent one has ended by then, with no input and no wake."""
    from omni.engine import DecoderModel, Engine, EngineLoop, Sequence

    class Row(Sequence):
        arrived = False

        def has_input(self):
            return self.arrived

    engine = Engine(DecoderModel(None, None, None, torch.device("cpu")), EngineConfig(batch_wait_s=1.0))
    loop = EngineLoop(engine)

    async def gather(urgent: bool) -> None:
        seq = Row("r", 8, set())
        seq.urgent = urgent
        engine._rows = [seq]
        loop._wake = asyncio.Event()  # what the loop's start creates
        t0 = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(loop._gather(True))
        for _ in range(20):
            await asyncio.sleep(0)
        if urgent:
            assert task.done()  # no input, no wake: it did not wait
        else:
            # waiting for the row's input (or its 1 s: a stalled machine, then this is not a test of the wait)
            assert not task.done() or asyncio.get_running_loop().time() - t0 >= 1.0
            seq.arrived = True
            loop.wake()  # what a row's input arriving does
        await asyncio.wait_for(task, 60)

    asyncio.run(gather(False))
    asyncio.run(gather(True))


def test_readers_during_a_step_that_admits_see_the_queue_not_an_error():
    """The event loop reads the pending queue (ready_sequences for its queue-time accounting at each wake, load for
    the stats) while the worker thread's step admits from it. Reading the deque itself raised "deque mutated during
    iteration" when a popleft came between two items, which failed the stream that woke the loop (a CI run of 20
    concurrent speech streams lost one). Here the step's popleft comes at exactly that moment: inside the reader's
    iteration, through the readiness check it makes per item."""
    from omni.engine import DecoderModel, Engine, Sequence

    engine = Engine(DecoderModel(None, None, None, torch.device("cpu")), EngineConfig(max_num_seqs=8))

    class Arrival(Sequence):
        def ready_to_prefill(self):
            if engine._pending and engine._pending[0] is not self:
                engine._pending.popleft()  # what the step's admission does meanwhile, in its own thread
            return True

    seqs = [Arrival(f"r{i}", 8, set()) for i in range(4)]
    for seq in seqs:
        engine.add(seq)
    ready = engine.ready_sequences()
    assert ready == seqs[:4] and len(engine._pending) < 4  # the queue as it was when read, while it shrank
    running, waiting = engine.load()
    assert (running, waiting) == (0, len(engine._pending))


def test_inbox_taken_by_two_threads_at_once_applies_in_fed_order():
    """A Talker row's inbox (the Thinker's replies, in order) is drained by the engine's step in its worker thread and
    by the event loop's accounting (has_input during a step). Here the worker is held inside applying the first item
    while the other thread drains: without the inbox's lock that thread took and applied the later items first, and
    the row would read its replies out of order."""
    import threading

    from omni.sequence import Inbox

    inbox, applied = Inbox(), []
    first_taken, release = threading.Event(), threading.Event()

    def held_at_first(item):
        if item == 0:
            first_taken.set()
            assert release.wait(30)
        applied.append(item)

    for i in range(4):
        inbox.put(i)
    worker = threading.Thread(target=inbox.take, args=(held_at_first,))
    worker.start()
    assert first_taken.wait(30)
    loop = threading.Thread(target=inbox.take, args=(applied.append,))
    loop.start()
    loop.join(0.3)  # time for it to take items 1-3, if it could
    release.set()
    worker.join(30)
    loop.join(30)
    assert applied == [0, 1, 2, 3] and len(inbox) == 0
