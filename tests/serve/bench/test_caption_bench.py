"""`omni bench caption` end to end on the tiny checkpoint with 4 files: both paths caption every file, the greedy
captions agree, the ratio comes from the same run, the table and caption.json are written. No timing asserts beyond
sanity (the machine is shared)."""

import argparse
import json

import pytest

from omni.serve.bench.caption import CaptionBenchConfig, main, make_files


def test_cli_parses_the_caption_suite():
    from omni.serve.cli import parser

    args = parser().parse_args(["bench", "caption", "--model", "small", "--files", "64"])
    assert args.suite == "caption" and CaptionBenchConfig.from_args(args) == CaptionBenchConfig(model="small", files=64)
    assert parser().parse_args(["bench", "--quick"]).suite is None  # the serving bench is unchanged


def test_make_files_gives_distinct_media_of_each_kind(tmp_path):
    from omni.serve.caption_io import load_file

    files = make_files(tmp_path, 4)
    assert [load_file(str(f))[0] for f in files] == ["image", "audio", "image", "video"]
    assert len({f.read_bytes() for f in files}) == 4


@pytest.mark.slow
def test_caption_bench_on_tiny(tmp_path, capsys):
    rc = main(argparse.Namespace(suite="caption", model="tiny", files=4, max_tokens=4, out=str(tmp_path)))
    assert rc == 0
    r = json.loads((tmp_path / "caption.json").read_text())
    assert r["files"] == 4 and r["ours"]["ok"] == 4 and r["captions_equal"] == 4
    assert r["ratio"] == pytest.approx(r["ours"]["files_per_s"] / r["loop"]["files_per_s"])
    for side in ("ours", "loop"):
        assert r[side]["wall_s"] > 0 and all(v >= 0 for v in r[side]["stage_s"].values())
    assert r["ours"]["stage_s"]["thinker (continuous batch)"] > 0
    assert {"ray", "encode_ready", "thinker_ready", "first_row", "end"} <= set(r["ours"]["timeline_s"])
    out = capsys.readouterr().out
    assert "| files/s, end to end" in out and "captions equal to the official path's | 4/4" in out
