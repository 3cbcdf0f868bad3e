"""`omni bench load`'s parts without Ray: its flags, its request mix, its clients against the HTTP app over the
in-process pipeline (real SSE streams, 503s past the app's limit), and the typed results and their table. The run
against `omni serve` (32 clients, replica memory) is tests/serve/cluster/test_app_faults.py."""

import asyncio
import json

import httpx
import pytest

from omni.serve.bench.load import MIX_KINDS, LoadConfig, drive, request_body
from omni.serve.bench.load_results import LoadResults, Outcome, Phase, ReplicaMemory, markdown
from omni.serve.cli import parser


def test_cli_has_bench_load_and_keeps_bench():
    args = parser().parse_args(
        ["bench", "load", "--clients", "4", "--duration", "5", "--mix", "text, speech", "--url", "http://127.0.0.1:9"]
    )
    assert args.func.__name__ == "run_bench_command" and args.suite == "load"  # dispatched to bench load by the suite
    cfg = LoadConfig.from_args(args)
    assert (cfg.clients, cfg.duration, cfg.mix, cfg.url) == (4, 5.0, ("text", "speech"), "http://127.0.0.1:9")
    assert LoadConfig.from_args(parser().parse_args(["bench", "load"])) == LoadConfig()  # 32 clients x 60 s, tiny
    assert LoadConfig().clients == 32 and LoadConfig().duration == 60
    assert parser().parse_args(["bench", "--quick"]).func.__name__ == "run_bench_command"
    with pytest.raises(ValueError, match="mix"):
        LoadConfig(mix=("smell",))
    with pytest.raises(ValueError, match="clients"):
        LoadConfig(clients=0)


def test_request_bodies_carry_what_their_kind_says():
    media = {"image": {"type": "image_url"}, "audio": {"type": "input_audio"}}
    bodies = {k: request_body(k, 3, LoadConfig(max_tokens=5, speech_tokens=7), media) for k in MIX_KINDS}
    for kind, body in bodies.items():
        assert body["stream"] and body["max_tokens"] == 5 and body["temperature"] == 0
        types = [p["type"] for p in body["messages"][0]["content"]]
        assert ("image_url" in types) == ("image" in kind) and ("input_audio" in types) == ("audio" in kind)
        assert ("modalities" in body) == ("speech" in kind)
    assert bodies["speech"]["sampling_params_list"][1]["max_tokens"] == 7


def test_clients_against_the_http_app_count_completions_and_503s(pipeline):
    """3 clients against an app that admits 1 request at a time: every request completes or is refused with 503 +
    Retry-After; speech requests bring audio; no other outcome."""
    from omni.serve.api.server import ServerSettings, build_fastapi

    app = build_fastapi(pipeline, ServerSettings(max_concurrent_requests=1))
    cfg = LoadConfig(clients=3, mix=("text", "speech", "image"), max_tokens=4, speech_tokens=24)
    outcomes = asyncio.run(drive("http://app", cfg, 4.0, transport=httpx.ASGITransport(app=app)))
    phase = Phase.of(outcomes, 4.0)
    assert phase.outcomes["ok"] >= 1 and phase.outcomes["refused"] >= 1, phase.outcomes
    assert phase.outcomes["ok"] + phase.outcomes["refused"] == phase.requests
    assert set(phase.statuses) == {"200", "503"} and phase.retry_after == ["1"]
    assert phase.server_errors == 0 and phase.refused_without_retry_after == 0
    for o in outcomes:
        if o.kind == "ok":
            assert o.completion_tokens > 0 and o.ttft is not None
            assert (o.audio_s > 0) == o.speak
        else:
            assert o.error_code == "overloaded"


def _results(outcomes, start_mb=100.0, end_mb=105.0) -> LoadResults:
    memory = [
        ReplicaMemory(
            "Thinker",
            "SERVE_REPLICA::omni#Thinker#abc",
            "n1",
            7,
            start_mb,
            end_mb,
            max(start_mb, end_mb),
            [start_mb, end_mb],
        )
    ]
    return LoadResults(
        url="http://x",
        model="tiny",
        config="tiny",
        max_concurrent_requests=2,
        clients=3,
        settings=LoadConfig().__dict__,
        warmup=Phase.of([], 1.0),
        load=Phase.of(outcomes, 10.0),
        replicas=memory,
        rss_tolerance=0.10,
        notes=[],
        wall_s=12.0,
    )


def test_results_pass_only_without_5xx_hangs_or_memory_growth():
    ok = Outcome("ok", 200, True, 0.0, 2.0, ttft=0.5, ttfap=1.0, completion_tokens=4, audio_s=0.5)
    refused = Outcome("refused", 503, False, 0.1, 0.2, retry_after="1", error_code="overloaded")
    good = _results([ok, ok, refused])
    assert good.passed and good.rss_flat and good.load.e2e_s.p95 == 2.0 and good.load.completed_per_s == 0.2
    doc = good.to_json()
    assert doc["passed"] and doc["replicas"][0]["change"] == pytest.approx(0.05)
    json.dumps(doc)
    table = markdown(good)
    assert "| 3 | 2 | 1 | 0 | 0 |" in table and "PASS" in table and "+5.0%" in table
    assert not _results([ok, Outcome("http_error", 500, False, 0, 1)]).passed  # a 500
    assert not _results([ok, Outcome("timeout", 200, False, 0, 150)]).passed  # a hang
    no_header = _results([ok, Outcome("http_error", 503, False, 0, 1)])  # a 503 without Retry-After
    assert no_header.load.refused_without_retry_after == 1 and not no_header.passed
    assert not _results([ok], end_mb=120.0).passed  # memory grew 20 %


def test_replica_memory_at_start_and_end_is_the_lowest_reading_once_a_phase_is_over(monkeypatch):
    """The replicas hand freed pages back every few seconds (malloc_trim), so "start" and "end" are each a replica's
    lowest RSS over the settle window: pages already freed but not yet handed back do not count; a leak does."""
    from omni.serve.bench import load
    from omni.serve.cluster import replicas as rp

    mib = 2**20
    reps = [rp.Replica("Vocoder", "v", "a1", 11, "n"), rp.Replica("Thinker", "t", "a2", 12, "n")]
    # settle 0.02 s in steps of 0.02 s: two readings per window; the sampling thread reads nothing in between
    vocoder = iter([1200, 1000, 1300, 1050])  # start: freed pages not handed back yet, then trimmed; end: the same
    thinker = iter([900, 900, 1300, 1250])  # a leak: the end stays high
    readings = lambda _: {  # noqa: E731
        "v": rp.Memory(next(vocoder) * mib, 500 * mib),
        "t": rp.Memory(next(thinker) * mib, 400 * mib),
    }
    monkeypatch.setattr(rp, "list_replicas", lambda: reps)
    monkeypatch.setattr(rp, "replica_memory", readings)
    sampler = load._MemorySampler(every=3600, settle=0.02)
    sampler.start()
    by = {m.deployment: m for m in sampler.stop()}
    assert (by["Vocoder"].rss_start_mb, by["Vocoder"].rss_end_mb, by["Vocoder"].rss_max_mb) == (1000, 1050, 1300)
    assert abs(by["Vocoder"].change - 0.05) < 1e-9
    assert (by["Thinker"].rss_start_mb, by["Thinker"].rss_end_mb) == (900, 1250) and by["Thinker"].change > 0.10
