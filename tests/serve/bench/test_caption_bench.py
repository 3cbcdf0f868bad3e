"""`omni bench caption`'s CLI and its media. Its run end to end on the tiny checkpoint is in
tests/serve/cluster/test_caption.py (test_caption_bench_on_tiny), on that module's Ray: a Ray start less."""

from omni.serve.bench.caption import CaptionBenchConfig, make_files


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
