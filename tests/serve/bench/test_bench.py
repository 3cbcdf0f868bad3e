"""`omni bench` end to end on the tiny checkpoint with the quick setting: every metric present and sane, ratios taken
from the same run, the greedy paths agreeing token for token, the Markdown table written and printed. No timing
asserts beyond sanity (the machine is shared)."""

import argparse
import importlib.util
import json
import time

import numpy as np
import pytest

from omni.serve.bench.run import QUICK, BenchConfig, main


def test_config_from_args_tolerates_missing_flags_and_parses_lists():
    assert BenchConfig.from_args(argparse.Namespace(model="tiny", out="o")) == BenchConfig(model="tiny", out="o")
    cfg = BenchConfig.from_args(
        argparse.Namespace(
            model="small", out="o", quick=True, concurrency="1, 3", inputs="image,audio", max_tokens=None, no_plot=True
        )
    )
    assert cfg.concurrency == (1, 3) and cfg.inputs == ("image", "audio") and not cfg.plot
    assert cfg.max_tokens == QUICK["max_tokens"] and cfg.requests == QUICK["requests"]  # --quick fills the rest
    from omni.serve.cli import parser

    cfg = BenchConfig.from_args(
        parser().parse_args(
            [
                "bench",
                "--via",
                "http",
                "--request-rate",
                "0.5,2",
                "--modes",
                "text+speech",
                "--url",
                "http://h:1",
                "--no-encoders",
            ]
        )
    )
    assert (cfg.via, cfg.request_rate, cfg.modes, cfg.url, cfg.encoders) == (
        "http",
        (0.5, 2.0),
        ("text+speech",),
        "http://h:1",
        False,
    )
    assert BenchConfig().max_tokens == 100 and 250 <= BenchConfig().speech_tokens <= 400  # realistic by default
    assert set(BenchConfig().inputs) == {"text", "image", "audio", "video"}
    with pytest.raises(ValueError, match="via"):
        BenchConfig(via="carrier-pigeon")
    with pytest.raises(ValueError, match="request rates"):
        BenchConfig(request_rate=(0.0,))
    with pytest.raises(ValueError, match="inputs must be among"):
        BenchConfig(inputs=("smell",))
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=(0,))


def _positive(summary: dict, speech: bool) -> None:
    for key in ("req_per_s", "text_tokens_per_s", "wall_s"):
        assert summary[key] > 0, key
    for key in ("ttft_s", "e2e_s"):
        assert 0 < summary[key]["mean"] <= summary[key]["max"], key
    assert summary["ttft_s"]["mean"] <= summary["e2e_s"]["mean"] + 1e-9
    if speech:
        assert summary["audio_s"] > 0 and summary["codec_tokens"] > 0 and summary["rtf"] > 0
        assert summary["ttfap_s"]["mean"] >= summary["ttft_s"]["mean"]  # speech follows its text
        assert summary["ttfap_s"]["mean"] <= summary["e2e_s"]["mean"] + 1e-9
    else:
        assert summary["audio_s"] == 0 and summary["rtf"] is None and summary["ttfap_s"] is None


@pytest.mark.slow
def test_quick_bench_on_tiny(tmp_path, capsys):
    t0 = time.time()
    rc = main(argparse.Namespace(model="tiny", out=str(tmp_path), quick=True))
    elapsed = time.time() - t0
    assert rc == 0
    assert elapsed < 300, f"the quick bench took {elapsed:.0f} s"  # a hang guard: ~40 s alone on 2 cores

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "tiny" and results["device"] == "cpu"
    assert results["settings"]["concurrency"] == list(QUICK["concurrency"])
    levels = {(lv["mode"], lv["concurrency"]): lv for lv in results["levels"]}
    assert set(levels) == {(m, c) for m in ("text", "text+speech", "speech") for c in QUICK["concurrency"]}
    for (mode, c), lv in levels.items():
        speech = mode != "text"  # chat with speech, or the speech endpoint's forced reply
        assert lv["requests"] == max(c, QUICK["requests"])
        ours, official = lv["ours"], lv["official"]
        for s in (ours, official):
            assert s["requests"] == lv["requests"]
            _positive(s, speech)
        # the same greedy requests give the same tokens through both paths (so their throughputs compare)
        assert lv["match"]["text_ids"] == 1.0
        assert ours["visible_text"] == official["visible_text"] > 0  # same ids, same text: TTFT measured on both
        assert ours["text_tokens"] == official["text_tokens"] > 0
        if speech:
            assert lv["match"]["codec_ids"] == 1.0 and ours["codec_tokens"] == official["codec_tokens"]
            assert ours["audio_s"] == pytest.approx(official["audio_s"])
        # the official path streams nothing: its first text and first audio are its whole reply
        assert official["ttft_s"] == official["e2e_s"]
        if speech:
            assert official["ttfap_s"] == official["e2e_s"]
            assert ours["ttft_s"]["mean"] < ours["e2e_s"]["mean"]  # ours streams text before the speech ends
        # ratios come from this run's own numbers
        r = lv["ratio"]
        assert r["req_per_s"] == pytest.approx(ours["req_per_s"] / official["req_per_s"])
        assert r["text_tokens_per_s"] == pytest.approx(ours["text_tokens_per_s"] / official["text_tokens_per_s"])
        assert r["ttft"] == pytest.approx(ours["ttft_s"]["mean"] / official["ttft_s"]["mean"])
        assert r["e2e"] == pytest.approx(ours["e2e_s"]["mean"] / official["e2e_s"]["mean"])
        if speech:
            assert r["ttfap"] == pytest.approx(ours["ttfap_s"]["mean"] / official["ttfap_s"]["mean"])
            assert r["rtf"] == pytest.approx(ours["rtf"] / official["rtf"])
        else:
            assert r["ttfap"] is None and r["rtf"] is None

    for lv in results["levels"]:  # the in-process pipeline's stage counters over each level
        assert "thinker" in lv["stages"] and lv["stages"]["thinker"]["steps"] >= 1
        assert ("vocoder" in lv["stages"]) == (lv["mode"] != "text")
    for name in ("image", "audio"):
        e = results["encoders"][name]
        assert e["items"] == e["batch_size"] == QUICK["encoder_items"]
        assert e["batch1_items_per_s"] > 0 and e["batch_items_per_s"] > 0
        assert e["speedup"] == pytest.approx(e["batch_items_per_s"] / e["batch1_items_per_s"])
    assert results["encoders"]["processor_s"] > 0
    assert 0 < results["wall_s"] <= elapsed

    md = (tmp_path / "results.md").read_text()
    out, err = capsys.readouterr()
    assert md in out  # the table is printed too
    assert "CPU run: read the ratios" in md and "| text+speech | c=2 | 2 |" in md and "| audio | 4 |" in md
    assert "text+speech c=2 official: 2/2 requests done" in err  # progress on stderr
    assert "| speech | c=2 | 2 |" in md and "TTFAP, speech endpoint (ms)" in md
    assert importlib.util.find_spec("matplotlib") is not None  # in the test extras: the plot is tested, not skipped
    from PIL import Image

    with Image.open(tmp_path / "results.png") as png:  # 22 x 4 inches at 100 dpi: five panels, drawn
        assert png.format == "PNG" and png.size == (2200, 400)
        colors = png.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, markers, bars and text, not a blank canvas


def test_playback_counts_the_gaps_a_real_time_player_hears():
    from omni.serve.api.metrics import Playback

    pb = Playback()
    for t, seconds in [(1.0, 0.5), (1.2, 0.5), (2.0, 0.04), (2.1, 1.0)]:  # plays 1.0-2.0, 2.0-2.04, gap, 2.1-3.1
        pb.add(t, seconds)
    assert pb.stalls == pytest.approx([0.06]) and pb.audio_s == pytest.approx(2.04)
    assert not pb.continuous  # one gap of 60 ms > 50 ms
    late = Playback()
    late.add(0.0, 0.2)
    late.add(0.24, 0.2)  # a 40 ms gap: heard, but within the 50 ms bound
    assert late.stall_s == pytest.approx(0.04) and late.continuous


def test_open_loop_sends_at_poisson_arrivals_whatever_is_running(monkeypatch):
    """On a virtual clock (the bench module's perf_counter and sleep): request i goes out at its arrival time exactly,
    and no reply comes before every request is out, so a loop that waited for replies would time out here."""
    import asyncio
    import types

    from omni.serve.bench import run
    from omni.serve.bench.run import Sample, arrivals, open_loop

    at = arrivals(6, rate=20.0, seed=3)
    assert at[0] == 0 and (np.diff(at) > 0).all() and 0.05 < at[-1] < 1.5  # 5 gaps of mean 50 ms
    clock = [1000.0]

    async def sleep(seconds):
        await asyncio.sleep(0)  # what is already sent starts first, at the time it was sent
        clock[0] += max(0.0, seconds)

    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(
        run, "asyncio", types.SimpleNamespace(sleep=sleep, ensure_future=asyncio.ensure_future, gather=asyncio.gather)
    )
    sent = []

    async def go():
        all_out = asyncio.Event()

        async def one(i):
            sent.append(clock[0])
            if len(sent) == 6:
                all_out.set()
            await asyncio.wait_for(all_out.wait(), 60)  # replies only once every request is out
            return Sample(None, None, 0.3, 0, 0, 0.0, [], [])

        return await open_loop(one, 6, 20.0, 3, lambda n: None)

    samples, wall = asyncio.run(go())
    assert len(samples) == 6
    assert np.asarray(sent) - sent[0] == pytest.approx(at, abs=1e-9)  # each request went out at its arrival time
    assert wall == pytest.approx(at[-1], abs=1e-9)


@pytest.mark.slow
def test_bench_via_http_reads_streams_as_a_client_and_matches_the_official_path(pipeline, tmp_path):
    """`--via http` against the HTTP app over the in-process pipeline (the same app `omni serve` runs, without Ray):
    the SSE replies equal the official path's (text and audio length), latencies and playback are measured per
    stream, closed and open loop."""
    import httpx

    from omni.serve.api.server import ServerSettings, build_fastapi
    from omni.serve.bench.report import write_report
    from omni.serve.bench.run import run_bench

    cfg = BenchConfig(
        via="http",
        modes=("text+speech", "speech"),
        concurrency=(1, 2),
        request_rate=(4.0,),
        requests=2,
        max_tokens=8,
        speech_tokens=48,
        inputs=("text", "image"),
        encoders=False,
        plot=False,
        out=str(tmp_path),
    )
    app = build_fastapi(pipeline, ServerSettings())
    results = run_bench(cfg, transport=httpx.ASGITransport(app=app), pipeline=pipeline)
    assert results.via == "http" and results.encoders is None
    labels = {(lv.mode, lv.label) for lv in results.levels}
    assert labels == {(m, load) for m in cfg.modes for load in ("c=1", "c=2", "4/s")}
    for lv in results.levels:
        assert lv.match.text_ids == 1.0 and lv.match.codec_ids == 1.0, (lv.mode, lv.label)  # what users got
        o = lv.ours
        assert o.audio_s == pytest.approx(lv.official.audio_s) and o.audio_s > 0
        for st in (o.ttfap_s, o.e2e_s):
            assert 0 < st.p50 <= st.p95 <= st.p99 <= st.max
        assert o.ttfap_s.max <= o.e2e_s.max and o.rtf > 0
        assert o.stall_s is not None and o.stall_s.mean >= 0 and 0 <= o.continuity_ok <= 1
        assert lv.official.continuity_ok == 1.0  # one packet: never stalls
        if lv.mode == "text+speech":
            assert o.ttft_s is not None and o.ttft_s.p50 <= o.ttfap_s.p50
        # where the time went, from the server's /metrics: every generating stage stepped, with plausible batches
        assert set(lv.stages) == {"thinker", "talker", "vocoder"}, lv.stages
        for st in lv.stages.values():
            assert st["steps"] >= 1 and 1 <= st["mean_batch"] <= 2 * max(cfg.concurrency) and st["busy_s"] > 0
    md = write_report(results, tmp_path, plot=False)
    assert "over streaming HTTP" in md and "| text+speech | 4/s | 2 |" in md and "## Goals" in md
    assert "streams without a stall > 50 ms" in md and "## Where the time goes" in md and "| vocoder |" in md
