"""`omni bench` end to end on the tiny checkpoint with the quick setting: every metric present and sane, ratios taken
from the same run, the greedy paths agreeing token for token, the Markdown table written and printed. No timing
asserts beyond sanity (the machine is shared)."""
import argparse
import importlib.util
import json
import time

import pytest

from omni.serve.bench.run import QUICK, BenchConfig, main


def test_config_from_args_tolerates_missing_flags_and_parses_lists():
    assert BenchConfig.from_args(argparse.Namespace(model="tiny", out="o")) == BenchConfig(model="tiny", out="o")
    cfg = BenchConfig.from_args(argparse.Namespace(model="small", out="o", quick=True, concurrency="1, 3",
                                                   inputs="image,audio", max_tokens=None, no_plot=True))
    assert cfg.concurrency == (1, 3) and cfg.inputs == ("image", "audio") and not cfg.plot
    assert cfg.max_tokens == QUICK["max_tokens"] and cfg.requests == QUICK["requests"]  # --quick fills the rest
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
    assert "CPU run: read the ratios" in md and "| text+speech | 2 | 2 |" in md and "| audio | 4 |" in md
    assert "text+speech c=2 official: 2/2 requests done" in err  # progress on stderr
    assert "| speech | 2 | 2 |" in md and "TTFAP, speech endpoint (ms)" in md
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "results.png").exists() == has_mpl
    if not has_mpl:
        assert "matplotlib is not installed" in err
