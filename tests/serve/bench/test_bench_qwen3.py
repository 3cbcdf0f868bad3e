"""`omni bench` on the tiny Qwen3-Omni, beside Qwen2.5's: the same phases and ratios against the official path, the
greedy paths agreeing on text ids and on every frame's 16 codebook ids; several models give a side-by-side table."""

import argparse
import dataclasses

import pytest

from omni.serve.bench.run import QUICK, BenchConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from omni.serve.bench.run import run_bench

    return run_bench(BenchConfig(model="tiny-qwen3", out=str(tmp_path_factory.mktemp("bench")), plot=False, **QUICK))


def test_quick_bench_on_tiny_qwen3(results):
    assert results.model == "tiny-qwen3"
    assert {(lv.mode, lv.concurrency) for lv in results.levels} == {
        (m, c) for m in ("text", "text+speech", "speech") for c in QUICK["concurrency"]
    }
    for lv in results.levels:
        assert lv.match.text_ids == 1.0
        if lv.mode != "text":  # chat with speech, or the speech endpoint's forced reply
            ours, official = lv.ours, lv.official
            assert lv.match.codec_ids == 1.0  # frames of 16 codebooks, the same through both paths
            assert ours.codec_tokens == official.codec_tokens == lv.requests * (QUICK["speech_tokens"] - 1)
            assert ours.audio_s == pytest.approx(official.audio_s, abs=1e-3)
            assert ours.ttfap_s.mean < official.ttfap_s.mean  # ours streams its first audio
            assert lv.ratio.ttfap == pytest.approx(ours.ttfap_s.mean / official.ttfap_s.mean)


def test_several_models_side_by_side(results, tmp_path, monkeypatch, capsys):
    import omni.serve.bench.run as run

    ran = []

    def fake_run(config):  # the real Qwen3 run stands in for both models here (the Qwen2.5 one has its own test)
        ran.append(config.out)
        return dataclasses.replace(results, model=config.model)

    monkeypatch.setattr(run, "run_bench", fake_run)
    assert run.main(argparse.Namespace(model="tiny, tiny-qwen3", out=str(tmp_path), quick=True, no_plot=True)) == 0
    assert ran == [str(tmp_path / "tiny"), str(tmp_path / "tiny-qwen3")]
    table = (tmp_path / "compare.md").read_text()
    for model in ("tiny", "tiny-qwen3"):
        assert (tmp_path / model / "results.md").exists()
        assert sum(
            f"| `{model}` | {mode} |" in line
            for line in table.splitlines()
            for mode in ("text", "text+speech", "speech")
        ) == 3 * len(QUICK["concurrency"])
    assert table in capsys.readouterr().out
