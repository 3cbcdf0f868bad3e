"""`omni bench prefill` on the tiny checkpoint: one run through the CLI, every policy measured on the same prompts,
the greedy ids equal across policies (exit 0), the chunked policy prefilling in chunks, JSON and Markdown written.
No timing asserts (the machine is shared): the figures go to BENCHMARKS.md."""

import json
import math

from omni.serve.cli import main


def test_prefill_bench_runs_every_policy_with_equal_ids(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(
        [
            "bench",
            "prefill",
            "--model",
            "tiny",
            "--arrivals",
            "2",
            "--prompt-tokens",
            "300",
            "--chunk",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "prefill.json").read_text())
    L = report["prompt_tokens"]
    assert 300 <= L <= 400  # the asked length plus the chat template
    rows = {r["policy"]: r for r in report["results"]}
    assert list(rows) == ["unbounded", "budget", "chunked"]
    assert rows["unbounded"]["max_prefill_tokens"] == 0 and rows["budget"]["max_prefill_tokens"] == L
    assert rows["chunked"]["prefill_chunk_tokens"] == 64
    # the two arrivals (3 prefills with the running request's) whole, or in chunks of 64
    assert rows["unbounded"]["prefill_forwards"] == rows["budget"]["prefill_forwards"] == 3
    assert rows["chunked"]["prefill_forwards"] >= 2 * math.ceil(L / 64) + 1
    ids = rows["unbounded"]["token_ids"]
    assert len(ids) == 3 and all(r["token_ids"] == ids for r in rows.values())
    for r in rows.values():
        assert 0 < r["gap_p50_ms"] <= r["stall_max_ms"] and 0 < r["arrival_ttft_p50_ms"] <= r["arrival_ttft_max_ms"]
    md = (out / "prefill.md").read_text()
    assert "| chunked | 64 | 64 |" in md and "equal across policies (greedy): yes" in md
    assert "| chunked |" in capsys.readouterr().out
