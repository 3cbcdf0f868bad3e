"""`omni bench realtime` on the tiny checkpoint with 2 turns, one conversation per path: the table and realtime.json
have a row per turn, every time is positive, the ratios are the table's own values divided, and the chat path's
prompt grows with the conversation; with `--sessions 1,2`, a turn-latency level per session count (every turn of
every session sampled, the server's histogram counted them) and the goal check. No timing asserts (the machine is
shared)."""

import argparse
import json

import pytest

from omni.serve.bench.realtime import PATHS, RealtimeBenchConfig, main


def test_cli_parses_the_realtime_suite():
    from omni.serve.cli import parser

    args = parser().parse_args(["bench", "realtime", "--turns", "5", "--repeats", "2", "--speech-tokens", "50"])
    assert args.suite == "realtime"
    assert RealtimeBenchConfig.from_args(args) == RealtimeBenchConfig(turns=5, repeats=2, speech_tokens=50)
    args = parser().parse_args(["bench", "realtime", "--sessions", "1,4,16"])
    assert RealtimeBenchConfig.from_args(args).sessions == (1, 4, 16)


@pytest.mark.slow
def test_realtime_bench_on_tiny(tmp_path, capsys):
    args = argparse.Namespace(
        suite="realtime",
        model="tiny",
        turns=2,
        repeats=1,
        max_tokens=4,
        speech_tokens=30,
        out=str(tmp_path),
        sessions="1,2",
    )
    assert main(args) == 0
    r = json.loads((tmp_path / "realtime.json").read_text())
    assert r["config"]["turns"] == 2 and [t["turn"] for t in r["turns"]] == [1, 2]
    for t in r["turns"]:
        assert set(t["ttfa_s"]) == set(PATHS) and all(v > 0 for v in t["ttfa_s"].values())
        assert all(len(v) == 1 and v[0] == t["ttfa_s"][p] for p, v in t["samples_s"].items())
        assert t["question_s"] > 0.5  # espeak-ng speech, not an empty turn
        k = str(t["turn"])
        assert r["ratios"]["realtime_over_chat"][k] == pytest.approx(t["ttfa_s"]["realtime"] / t["ttfa_s"]["chat"])
        for p in PATHS:
            assert r["ratios"]["vs_turn_1"][p][k] == pytest.approx(t["ttfa_s"][p] / r["turns"][0]["ttfa_s"][p])
    # turn 2 resends turn 1's question and reply: a longer prompt
    assert r["turns"][1]["prompt_tokens"] > r["turns"][0]["prompt_tokens"] > 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 5  # two turns in the TTFA table, turn 2 in the ratio table, 1 and 2 sessions
    assert (
        f"| 2 | {r['ratios']['vs_turn_1']['realtime']['2']:.2f} | {r['ratios']['vs_turn_1']['chat']['2']:.2f} |" in out
    )
    # concurrent sessions: 1 and 2 sessions of 2 turns each
    assert [lv["sessions"] for lv in r["sessions"]] == [1, 2]
    for lv in r["sessions"]:
        n = lv["sessions"]
        assert lv["turns"] == 2 * n and lv["server_turns"] == 2 * n and lv["server_turn_mean_s"] > 0
        for path in ("realtime", "chat"):
            st = lv[path]
            assert len(st["samples_s"]) == 2 * n and all(v > 0 for v in st["samples_s"])
            assert 0 < st["p50_s"] <= st["p95_s"] <= st["max_s"]
        assert f"| {n} | {2 * n} | {lv['realtime']['p50_s']:.3f} | {lv['realtime']['p95_s']:.3f} |" in out
    one = r["sessions"][0]
    goals = {g["name"]: g for g in r["goals"]}
    assert len(goals) == 2
    p50 = goals["realtime turn latency p50 at 1 session / chat TTFAP p50 at 1 session (same turns)"]
    assert p50["value"] == pytest.approx(one["realtime"]["p50_s"] / one["chat"]["p50_s"])
    assert p50["met"] == (p50["value"] <= 1.0)
    four = goals["realtime turn latency p95 at 4 sessions / p50 at 1 session"]
    assert four["value"] is None and four["met"] is None and "not measured" in out  # no 4-session level here
