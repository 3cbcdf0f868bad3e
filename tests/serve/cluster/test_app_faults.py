"""Load and faults against `omni serve` on the tiny checkpoint (the server test_app used, conftest.SharedServer: its own
Ray, this process joined to it), driven by `omni bench load`'s streaming clients:

- load: 32 clients for LOAD_S seconds, over a server whose concurrency limit is below 32: no 5xx, every request
  completes or is refused with 503 + Retry-After, every replica's RSS flat within 10%;
- faults: under load, each stage's replica in turn is `ray.kill`ed: the requests in flight end with an SSE error event
  or a 503 (code stage_unavailable) within FAIL_BOUND_S, none hangs (a call queued for the dead replica gives up
  after the server's stage_timeout_s), Serve starts a new replica, and then the same request gives the same text and
  speech bytes as before the kills (over HTTP).
"""

import asyncio
import base64
import threading
import time

import httpx
import pytest

from omni.serve.bench.load import LoadConfig, drive, run_load
from omni.serve.bench.load_results import markdown

from .conftest import APP_KEY, APP_STAGE_TIMEOUT_S

# serial: its load run and replica kills are bounded by stage timeouts that a second test worker's load can exceed
pytestmark = [pytest.mark.slow, pytest.mark.serial]

# the server (conftest.SharedServer) admits APP_LIMIT = 24 requests at once: below the load's 32 clients, so 503s
# happen; a call waiting for a replica that died gives up after its stage_timeout_s (APP_STAGE_TIMEOUT_S)
LOAD_S = 20  # seconds of measured load (the bench's default is 60: `omni bench load`)
FAIL_BOUND_S = APP_STAGE_TIMEOUT_S + 25  # a request in flight when its replica dies ends within this (a loaded machine)
REQUEST_TIMEOUT_S = 150  # a request not ended by then is a hang (a new replica takes ~30-120 s here to come up)
STAGES = ["VisionEncoder", "AudioEncoder", "Thinker", "Talker", "Vocoder"]
# the stages killed (each kill costs a replica restart, ~40 s here): the two encoders are one deployment class
# (_EncoderDeployment), so the vision one stands for both; the Talker is the same _GenerationDeployment as the
# Thinker (upstream) and the Vocoder (downstream), both killed
KILLED = ["VisionEncoder", "Thinker", "Vocoder"]
# what the fault load sends per stage: requests that pass through it (long speech for the generating stages, so
# that streams are in flight when the replica dies)
FAULT_MIX = {
    "VisionEncoder": ("image",),
    "AudioEncoder": ("audio+speech",),
    "Thinker": ("speech", "text"),
    "Talker": ("speech",),
    "Vocoder": ("speech",),
}
# the Thinker killed holds its rows this many steps: long enough that the rows it held when `stats` said so are still
# there when `ray.kill` lands (with 48, on a loaded CI machine, every row had finished its text first once)
THINKER_TOKENS = 160


@pytest.fixture(scope="module")
def server(tiny_app):
    return tiny_app.get()


@pytest.fixture(scope="module")
def probe(server):
    """-> ids(): the text and the speech (PCM bytes) of one image + audio + speech request (every stage), over HTTP as
    a client sees it; greedy with a fixed seed, so the same replicas' weights give the same bytes."""
    from omni.serve.bench.load import _media_parts

    media = _media_parts()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [media["image"], media["audio"], {"type": "text", "text": "What do you see and hear?"}],
            }
        ],
        "max_tokens": 12,
        "temperature": 0,
        "seed": 0,
        "modalities": ["text", "audio"],
        "audio": {"voice": "Chelsie", "format": "pcm16"},
        "sampling_params_list": [{}, {"temperature": 0.0, "max_tokens": 60}],
    }

    def ids() -> tuple[str, bytes]:
        for attempt in range(3):  # the app may not route to a new replica yet
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json=body,
                timeout=REQUEST_TIMEOUT_S,
                headers={"Authorization": f"Bearer {APP_KEY}"},
            )
            if r.status_code == 200:
                msg = r.json()["choices"][0]["message"]
                return msg["content"], base64.b64decode(msg["audio"]["data"])
            assert r.status_code == 503 and attempt < 2, r.text
            time.sleep(5)

    return ids


@pytest.fixture(scope="module")
def before(probe):
    """The probe's text and speech before any replica was killed."""
    text, pcm = probe()
    assert text and len(pcm) > 2 * 4800  # > 0.2 s of 16-bit speech
    return text, pcm


def test_32_streaming_clients_no_5xx_503s_with_retry_after_flat_memory(server, tmp_path):
    cfg = LoadConfig(
        url=server.url,
        ray_address=server.ray_address,
        clients=32,
        duration=LOAD_S,
        warmup=8,
        request_timeout=REQUEST_TIMEOUT_S,
        out=str(tmp_path),
        api_key=APP_KEY,
    )
    results = run_load(cfg)
    print(markdown(results))
    for phase in (results.warmup, results.load):
        assert set(phase.statuses) <= {"200", "503"}, phase.statuses
        assert phase.outcomes["ok"] + phase.outcomes["refused"] == phase.requests, phase.outcomes
        assert phase.refused_without_retry_after == 0 and phase.retry_after in ([], ["1"])
    load = results.load
    assert load.outcomes["ok"] >= 32 and load.outcomes["refused"] > 0  # 32 clients, room for 24: some refused
    assert load.speech_requests > 0 and load.audio_s > 0 and load.completion_tokens > 0
    assert load.longest_s < REQUEST_TIMEOUT_S
    assert {m.deployment for m in results.replicas} == {"Ingress", *STAGES}
    for m in results.replicas:
        assert m.change is not None and abs(m.change) <= 0.10, m
    assert results.passed


@pytest.mark.parametrize("stage", KILLED)
def test_killed_replica_fails_in_flight_requests_then_recovers_with_same_tokens(server, probe, before, stage):
    from omni.serve.cluster.replicas import kill_replica, list_replicas, wait_for_new_replica

    [old] = list_replicas("omni", stage)
    speech = stage in ("Thinker", "Talker", "Vocoder")
    cfg = LoadConfig(
        url=server.url,
        clients=6,
        mix=FAULT_MIX[stage],
        max_tokens=THINKER_TOKENS if stage == "Thinker" else 48 if speech else 8,
        speech_tokens=120 if speech else 24,
        request_timeout=REQUEST_TIMEOUT_S,
        api_key=APP_KEY,
    )
    t0, warm, stop = time.monotonic(), threading.Event(), threading.Event()
    oks = []

    def seen(o):
        if o.kind == "ok":
            oks.append(o)
            if len(oks) >= 2:
                warm.set()

    result = {}
    load = threading.Thread(
        target=lambda: result.update(outcomes=asyncio.run(drive(server.url, cfg, 600, t0, on_outcome=seen, stop=stop)))
    )
    load.start()
    assert warm.wait(180), "the load never got going"
    time.sleep(1.0)  # the clients' next requests are under way
    if stage in ("Thinker", "Talker"):  # kill it while it holds rows (their streams must fail)
        from ray import serve

        handle = serve.get_deployment_handle(stage, app_name="omni")
        deadline = time.monotonic() + 60
        while handle.stats.remote().result()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    t_kill = time.monotonic() - t0
    kill_replica(old)
    time.sleep(5)  # the load goes on while Serve replaces the replica (its requests meet the dead one)
    stop.set()
    load.join(REQUEST_TIMEOUT_S + 60)
    assert not load.is_alive(), "a request hung"
    outcomes = result["outcomes"]

    for o in outcomes:  # every request completed, or ended with an error the client can act on (retry)
        assert o.kind in ("ok", "refused", "error_event"), o
        if o.kind != "ok":
            assert o.status in (200, 503) and o.error_code == "stage_unavailable", o
        if o.kind == "refused":
            assert o.retry_after == "1", o
    in_flight = [o for o in outcomes if o.start < t_kill < o.end]
    assert in_flight
    for o in in_flight:
        assert o.end - t_kill < FAIL_BOUND_S, (o, t_kill)
    if speech:  # the streams the dead replica was serving failed (ones past its part may finish)
        assert any(o.kind != "ok" for o in in_flight), in_flight
    if stage == "Vocoder":  # every speech stream comes out of the vocoder: those under way all failed
        under_way = [o for o in in_flight if o.speak and o.ttft is not None and o.start + o.ttft < t_kill]
        assert under_way and all(o.kind != "ok" for o in under_way), in_flight
    # an encoder call is short (milliseconds on a quiet machine): whether one was mid-call at the kill is chance, so
    # for the encoders only the bounds above (no hang, clean errors) and the recovery below are asserted

    new = wait_for_new_replica("omni", stage, [old.name])
    assert new.pid != old.pid
    kinds = {k: sum(o.kind == k for o in in_flight) for k in ("ok", "error_event", "refused")}
    print(
        f"\n{stage} killed at {t_kill:.1f} s: {len(in_flight)} in flight {kinds}, the last ended "
        f"{max(o.end for o in in_flight) - t_kill:.1f} s after; {len(outcomes)} requests in all, "
        f"{sum(o.kind != 'ok' for o in outcomes)} failed; a new replica up "
        f"{time.monotonic() - t0 - t_kill:.0f} s after the kill"
    )
    deadline = time.monotonic() + 120
    while True:  # the app serves again
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=REQUEST_TIMEOUT_S,
            headers={"Authorization": f"Bearer {APP_KEY}"},
            json={"messages": [{"role": "user", "content": "Are you back?"}], "max_tokens": 4},
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert probe() == before  # the new replica gives the same greedy text and speech as the old one
