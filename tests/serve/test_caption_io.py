"""`omni caption`'s no-Ray half (serve/caption_io.py, serve/caption_output.py) on real media: listing (files,
folders, @lists), sniffing by content, the request it builds (the one `omni chat` builds), and the output file's
commit / repair / resume rules (JSON lines and Parquet)."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from omni.serve.caption_io import (
    DEFAULT_PROMPTS,
    ROW_FIELDS,
    CaptionError,
    caption_request,
    list_inputs,
    load_file,
    sniff_media_type,
)
from omni.serve.caption_output import CaptionOutput, Progress


def row(path, error=None, caption="x", **kw):
    return {
        "path": path,
        "media_type": "image",
        "caption": "" if error else caption,
        "prompt": "p",
        "num_tokens": 0 if error else 3,
        "seconds": 0.5,
        "model": "tiny",
        "error": error,
        **kw,
    }


# ---------------------------------------------------------------------------------------------------- listing
def test_list_inputs_recurses_reads_lists_and_dedupes(tmp_path):
    d = tmp_path / "media"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".cache").mkdir()
    for p in ("b.png", "a.wav", "sub/c.mp4", "sub/deeper/d.png", ".hidden.png", ".cache/e.png"):
        (d / p).write_bytes(b"x")
    one = tmp_path / "one.jpg"
    one.write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n\none.jpg\n{d / 'a.wav'}\nmissing.png\n")
    files = list_inputs([str(d), f"@{lst}", str(one)])
    assert [f.path for f in files] == [
        str(d / "a.wav"),
        str(d / "b.png"),
        str(d / "sub/c.mp4"),
        str(d / "sub/deeper/d.png"),
        str(one),
        str(tmp_path / "missing.png"),
    ]
    assert [f.rel for f in files][:5] == ["a.wav", "b.png", "sub/c.mp4", "sub/deeper/d.png", "one.jpg"]
    assert all(os.path.isabs(f.path) for f in files)
    with pytest.raises(CaptionError, match="no such file or folder"):
        list_inputs([str(tmp_path / "nope")])
    with pytest.raises(CaptionError, match="cannot read the list"):
        list_inputs([f"@{tmp_path / 'nolist.txt'}"])


def test_same_name_from_two_folders_gets_distinct_speech_names(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.png").write_bytes(b"x")
    files = list_inputs([str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.png")])
    assert len({f.rel for f in files}) == 2


# ---------------------------------------------------------------------------------------------------- sniffing
@pytest.fixture(scope="module")
def disguised(media_dir, tmp_path_factory):
    """Real media under misleading names, plus an audio-only MP4."""
    d = tmp_path_factory.mktemp("disguised")
    shutil.copy(media_dir / "image.png", d / "photo.mp3")
    shutil.copy(media_dir / "speech.wav", d / "voice.png")
    shutil.copy(media_dir / "clip.mp4", d / "movie.wav")
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(media_dir / "speech.wav"),
            "-c:a",
            "aac",
            "-f",
            "mp4",
            str(d / "song.mp4"),
        ],
        check=True,
    )
    return d


@pytest.mark.parametrize(
    "name, kind", [("photo.mp3", "image"), ("voice.png", "audio"), ("movie.wav", "video"), ("song.mp4", "audio")]
)
def test_media_type_comes_from_the_content(disguised, name, kind):
    assert sniff_media_type((disguised / name).read_bytes()) == kind
    got, media = load_file(str(disguised / name))
    assert got == kind
    if kind == "audio":
        assert media.dtype == np.float32 and media.ndim == 1 and len(media) > 16000
    if kind == "video":
        assert media.frames.ndim == 4 and media.audio is None  # the track only with use_audio_in_video


def test_bad_files_raise_one_line_reasons(media_dir, tmp_path):
    from omni.encoders.media import MediaError

    png = (media_dir / "image.png").read_bytes()
    mp4 = (media_dir / "clip.mp4").read_bytes()
    cases = {
        "corrupt.png": (png[:40] + b"\0" * 60, "image", "not a decodable image"),
        "truncated.mp4": (mp4[: len(mp4) // 2], "video", "not a decodable video"),
        "empty.wav": (b"", None, "empty file (0 bytes)"),
        "notes.txt": (b"just some text\n", None, "unsupported file: not an image, audio or video"),
        "short.wav": ((media_dir / "speech.wav").read_bytes()[:3000], "audio", "truncated audio file"),
    }
    for name, (data, kind, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError) as exc:
            load_file(str(tmp_path / name))
        assert exc.value.media_type == kind, name
        assert reason in str(exc.value) and "\n" not in str(exc.value) and "0x" not in str(exc.value), str(exc.value)
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    with pytest.raises(MediaError, match="cannot read the file: No such file or directory"):
        load_file(str(tmp_path / "dangling.png"))


# ---------------------------------------------------------------------------------------------------- request
@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_request_is_the_one_omni_chat_builds(media_dir, kind):
    """Same messages, media, sampling and flags as `omni chat --KIND F PROMPT`, so the same prompt ids."""
    from omni.prompt import processor_inputs
    from omni.serve.cli import build_chat_request, parser
    from omni.serve.cluster.caption_stages import _processor

    path = str(media_dir / {"image": "image.png", "audio": "speech.wav", "video": "clip.mp4"}[kind])
    chat = build_chat_request(
        parser().parse_args(["chat", f"--{kind}", path, "--max-tokens", "9", DEFAULT_PROMPTS[kind]])
    )
    got, media = load_file(path)
    ours = caption_request(got, media, DEFAULT_PROMPTS[kind], max_tokens=9)
    assert ours.sampling == chat.sampling and ours.use_audio_in_video == chat.use_audio_in_video
    assert [m.role for m in ours.messages] == [m.role for m in chat.messages] == ["user"]
    assert [type(p) for p in ours.messages[0].content] == [type(p) for p in chat.messages[0].content]
    processor = _processor("tiny")
    a, b = processor_inputs(processor, ours), processor_inputs(processor, chat)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


# ---------------------------------------------------------------------------------------------------- output
def test_jsonl_resume_cuts_a_torn_line_and_keeps_the_last_row_per_path(tmp_path):
    out = tmp_path / "rows.jsonl"
    good = [row("/m/a.png"), row("/m/b.png", error="bad")]
    out.write_text("".join(json.dumps(r) + "\n" for r in good) + json.dumps(row("/m/c.png"))[:30])  # killed mid-line
    o = CaptionOutput(str(out))
    kept = o.open(resume=True)
    assert [r["path"] for r in kept] == ["/m/a.png", "/m/b.png"]  # c's torn row is gone: c is redone
    o.append([row("/m/c.png")])
    o.close()
    lines = out.read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == ["/m/a.png", "/m/b.png", "/m/c.png"]
    assert all(list(json.loads(x)) == list(ROW_FIELDS) for x in lines)

    o = CaptionOutput(str(out))  # --retry-errors: b's error row leaves the file before b is redone
    assert [r["path"] for r in o.open(resume=True, retry_errors=True)] == ["/m/a.png", "/m/c.png"]
    assert [json.loads(x)["path"] for x in out.read_text().splitlines()] == ["/m/a.png", "/m/c.png"]
    o.append([row("/m/b.png")])
    o.close()
    rows = CaptionOutput(str(out)).read()
    assert sorted(r["path"] for r in rows) == ["/m/a.png", "/m/b.png", "/m/c.png"]
    assert all(r["error"] is None for r in rows)

    o = CaptionOutput(str(out))  # no --resume: a fresh output
    assert o.open(resume=False) == [] and out.read_text() == ""
    o.close()


def test_parquet_commits_part_files_and_merges_them(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "rows.parquet"
    o = CaptionOutput(str(out))
    o.open(resume=False)
    o.append([row("/m/a.png"), row("/m/b.png", error="bad")])
    o.append([row("/m/c.png")])
    assert len(list((tmp_path / "rows.parquet.parts").glob("part-*.parquet"))) == 2  # committed, not merged
    assert [r["path"] for r in CaptionOutput(str(out)).read()] == ["/m/a.png", "/m/b.png", "/m/c.png"]
    # the process dies here (no close): the next run merges what was committed
    o2 = CaptionOutput(str(out))
    kept = o2.open(resume=True, retry_errors=True)
    assert [r["path"] for r in kept] == ["/m/a.png", "/m/c.png"]
    assert not (tmp_path / "rows.parquet.parts").exists()
    o2.append([row("/m/b.png")])
    o2.close()
    table = pq.read_table(out)
    assert table.column_names == list(ROW_FIELDS)
    assert str(table.schema.field("num_tokens").type) == "int64" and str(table.schema.field("error").type) == "string"
    assert sorted(table.column("path").to_pylist()) == ["/m/a.png", "/m/b.png", "/m/c.png"]


def test_unwritable_output_and_bad_suffix_are_clear_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptionError, match="cannot write the output"):
        CaptionOutput(str(tmp_path / "file" / "rows.jsonl")).open(resume=False)
    with pytest.raises(CaptionError, match=r"\.jsonl or \.parquet"):
        CaptionOutput(str(tmp_path / "rows.csv"))
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    with pytest.raises(CaptionError, match="cannot resume"):
        CaptionOutput(str(tmp_path / "garbage.parquet")).open(resume=True)


def test_progress_lines_and_summary():
    import io

    s = io.StringIO()
    p = Progress(total=4, skipped=2, every_s=0.0, stream=s)
    p.update([row("/a"), row("/b", error="bad")])
    p.update([row("/c")])
    line = p.summary("out.jsonl")
    first = s.getvalue().splitlines()[0]
    assert first.startswith("caption: 2/4 files (1 ok, 1 failed), ") and "files/s, ETA " in first
    assert line.startswith("caption: 3 files, 2 ok, 1 failed, ") and "2 already done (resume)" in line
