"""`omni bench engine` on the tiny checkpoint with tiny sizes: one run through the CLI, the JSON's structure and sane
values (positive times, the cells and counts asked for); not the goals (the machine is shared: the figures go to
BENCHMARKS.md). And the CPU memory measure it relies on, against tensors of known size."""

import json

import torch

from omni.serve.bench.engine import cpu_step_memory
from omni.serve.cli import main


def test_cpu_step_memory_counts_what_a_step_allocates():
    keep = []

    def step():
        a = torch.empty(1 << 20)  # 4 MiB, freed at return
        keep.append(torch.empty(2 << 20))  # 8 MiB, kept
        b = torch.cat([a, a])  # 8 MiB, freed
        del b
        torch.empty(1 << 18)  # 1 MiB, freed at once

    allocated, peak = cpu_step_memory(step)
    assert allocated == (4 + 8 + 8 + 1) * 2**20
    assert peak == (4 + 8 + 8) * 2**20  # a, the kept one and b live together


def test_engine_bench_runs_every_cell(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(
        [
            "bench",
            "engine",
            "--model",
            "tiny",
            "--batches",
            "1,2",
            "--contexts",
            "16,32",
            "--steps",
            "2",
            "--admit-tokens",
            "8",
            "--goal-contexts",
            "8,24",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "engine.json").read_text())
    assert report["model"] == "tiny" and report["device"] == "cpu"
    cells = report["cells"]
    assert [(c["batch"], c["context"]) for c in cells] == [(1, 16), (2, 16), (1, 32), (2, 32)]
    assert [(c["batch"], c["context"]) for c in report["goal_cells"]] == [(8, 8), (8, 24)]
    for c in cells + report["goal_cells"]:
        assert c["rows_seen"] == c["batch"] and len(c["step_ms"]) == 2
        assert all(t > 0 for t in c["step_ms"]) and 0 < c["step_ms_min"] <= c["step_ms_median"]
        assert c["tokens_per_s"] > 0 and c["step_alloc_bytes"] > 0 and c["step_peak_bytes"] >= 0
    for c in cells:
        assert c["admit_step_ms"] > 0 and c["admit_peak_bytes"] > 0
        assert abs(c["admit_step_ms"] - c["step_ms_median"] - c["admit_extra_ms"]) < 1e-6
    assert all(c["admit_step_ms"] is None for c in report["goal_cells"])
    goals = report["goals"]
    assert len(goals) == 3 and all(g["value"] > 0 and g["met"] in (True, False) and g["bound"] == 1.5 for g in goals)
    assert "admission" in goals[0]["name"] and "2 x 32" in goals[0]["name"] and "1 x 16" in goals[0]["name"]
    md = (out / "engine.md").read_text()
    assert "| 2 | 32 |" in md and "| goal |" in md
    assert "| 8 | 24 |" in capsys.readouterr().out
