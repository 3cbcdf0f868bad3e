"""`omni caption` on one local Ray (2 CPUs, one Ray for the module): golden captions against the official transformers
generate on a mixed folder of real media, exact error rows, a Thinker worker killed mid-run, --speak and
--use-audio-in-video, the CLI's exit codes, progress and summary with resume / --retry-errors on Parquet, and runs of
the CLI interrupted by Ctrl-C and SIGTERM then resumed."""

import json
import os
import shutil
import signal
import wave

import numpy as np
import pytest

from omni.serve.caption_io import DEFAULT_PROMPTS, ROW_FIELDS
from omni.serve.caption_output import CaptionOutput
from omni.serve.cluster.caption import CaptionOptions, run_caption

from .conftest import MAX_TOKENS, check_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    # a Ray of its own ("local"), never one a previous module's `omni serve` is still shutting down
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def golden(mixed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "captions.jsonl"
    report = run_caption(
        [str(mixed_dir)], str(out), CaptionOptions(max_tokens=MAX_TOKENS, batch_size=4), progress_every_s=0.0
    )
    return out, report


def test_golden_captions_and_error_rows(golden, mixed_dir, oracle):
    out, report = golden
    lines = out.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    check_rows(rows, mixed_dir, oracle)
    assert (report.files, report.ok, report.failed, report.skipped) == (9, 5, 4, 0)
    assert not report.interrupted and report.files_per_s > 0
    assert set(report.stage_seconds) == {"decode", "encode", "thinker"} and report.stage_seconds["thinker"] > 0


class Gate:
    """A named pipe among the inputs, standing for an image: its decode task blocks in open() until the test opens
    the gate, so no row of it (nor of a file decoded after it) can be written before then, however fast the machine.
    open() writes the image's bytes to the reader (a thread: the write blocks until the reader is there);
    make_regular() replaces the pipe by a regular file with those bytes (for the oracle, or a later run)."""

    def __init__(self, path, image_bytes: bytes):
        self.path, self.data, self.thread = path, image_bytes, None
        os.mkfifo(path)

    def open(self) -> None:
        import threading

        if self.thread is None:
            self.thread = threading.Thread(target=self.path.write_bytes, args=(self.data,), daemon=True)
            self.thread.start()

    def close(self, timeout: float = 60) -> None:
        """Lets a writer still waiting for a reader go (no reader came: the run failed before the gate's decode)."""
        if self.thread is not None and self.thread.is_alive():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(timeout)
            os.close(fd)

    def make_regular(self) -> None:
        self.close()
        self.path.unlink()
        self.path.write_bytes(self.data)


def _wait_gone(pid: int, timeout: float = 60) -> None:
    """Returns once process `pid` has exited (a zombie counts: it runs nothing more)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs {timeout} s after SIGKILL")


def test_killed_thinker_worker_loses_no_row(mixed_dir, tmp_path, oracle):
    """SIGKILL the Thinker actor's process after the first committed row: Ray Data restarts the actor and retries
    its tasks; every file still gets exactly one row, the same rows as an undisturbed run. The last input is a Gate,
    opened only once the killed process is gone: its row comes from the restarted actor on any machine."""
    gate = Gate(tmp_path / "gate.png", (mixed_dir / "image.png").read_bytes())
    killed = []

    def kill_once(rows):
        if not killed:
            pid = int(rows[0]["thinker_pid"])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            _wait_gone(pid)
            gate.open()

    out = tmp_path / "captions.jsonl"
    try:
        report = run_caption(
            [str(mixed_dir), str(gate.path)],
            str(out),
            CaptionOptions(max_tokens=MAX_TOKENS, batch_size=1, thinker_calls=1),
            on_batch=kill_once,
        )
    finally:
        gate.close()
    assert killed and len(report.thinker_pids) >= 2, report.thinker_pids  # rows came from the restarted actor too
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    [gated] = [r for r in rows if r["path"] == str(gate.path)]
    assert gated["error"] is None and gated["media_type"] == "image"
    assert gated["caption"] == oracle(mixed_dir / "image.png", "image", gated["prompt"], MAX_TOKENS).text
    check_rows([r for r in rows if r is not gated], mixed_dir, oracle)


def test_speak_and_use_audio_in_video(media_dir, tmp_path, oracle, tiny):
    """--speak DIR writes DIR/<relative path>.wav at 24 kHz: the speech the in-process pipeline gives that request;
    --use-audio-in-video feeds the clip's own track (the caption is the official generate's with the flag)."""
    import asyncio

    from omni.serve.api.audio_io import pcm16_bytes
    from omni.serve.caption_io import caption_request, load_file
    from omni.serve.pipeline import Pipeline

    d = tmp_path / "media"
    (d / "a").mkdir(parents=True)
    shutil.copy(media_dir / "clip.mp4", d / "a" / "clip.mp4")
    shutil.copy(media_dir / "image.png", d / "image.png")
    speak = tmp_path / "speech"
    opts = CaptionOptions(max_tokens=6, use_audio_in_video=True, speak_dir=str(speak), max_speech_tokens=40)
    report = run_caption([str(d)], str(tmp_path / "c.jsonl"), opts)
    assert report.ok == 2
    rows = {os.path.relpath(r["path"], d): r for r in CaptionOutput(str(tmp_path / "c.jsonl")).read()}
    ref = oracle(d / "a" / "clip.mp4", "video", DEFAULT_PROMPTS["video"], 6, use_audio_in_video=True)
    assert rows["a/clip.mp4"]["caption"] == ref.text
    pipeline = Pipeline(tiny)
    for rel, kind in (("a/clip.mp4", "video"), ("image.png", "image")):
        with wave.open(str(speak / f"{rel}.wav")) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            got = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int32)
        kind_, media = load_file(str(d / rel), use_audio_in_video=True)
        req = caption_request(
            kind_, media, DEFAULT_PROMPTS[kind], 6, use_audio_in_video=True, speak=True, max_speech_tokens=40
        )
        result = asyncio.run(pipeline.run(req))
        assert result.text == rows[rel]["caption"]
        want = np.frombuffer(pcm16_bytes(result.waveform), "<i2").astype(np.int32)
        assert len(got) == len(want) > 0 and np.abs(got - want).max() <= 2, rel  # 16-bit rounding of ~1e-6 floats


def test_cli_exit_codes_resume_and_retry_errors_on_parquet(media_dir, tmp_path, oracle, capfd):
    """`omni caption` (its main, in process, on this module's Ray). Run 1, a folder of bad files: exit 1, the error
    rows written, progress and summary on stderr. Then one file is fixed and one added: --resume --retry-errors redoes
    the errored files and the new one, the fixed file's new row replaces its error row (one row per path). A further
    --resume has nothing left to do. Bad arguments and an unwritable output exit 2 before any work."""
    import pyarrow.parquet as pq

    from omni.serve.cli import main

    d = tmp_path / "media"
    d.mkdir()
    (d / "broken.png").write_bytes((media_dir / "image.png").read_bytes()[:60])
    (d / "empty.wav").write_bytes(b"")
    out = tmp_path / "captions.parquet"
    argv = ["caption", str(d), "--out", str(out), "--max-tokens", str(MAX_TOKENS)]
    assert main(argv) == 1  # nothing succeeded
    err = capfd.readouterr().err
    assert "omni caption: none of the 2 files could be captioned" in err and "Traceback" not in err
    assert "caption: 2/2 files (0 ok, 2 failed), " in err and "files/s, ETA" in err  # progress, then the summary
    assert "caption: 2 files, 0 ok, 2 failed, " in err and f"wrote {out}" in err
    assert [r["error"] is not None for r in pq.read_table(out).to_pylist()] == [True, True]

    shutil.copy(media_dir / "image.png", d / "broken.png")  # fixed
    shutil.copy(media_dir / "speech.wav", d / "speech.wav")  # new
    assert main(argv + ["--resume", "--retry-errors"]) == 0
    assert "caption: 3 files, 2 ok, 1 failed, " in capfd.readouterr().err
    table = pq.read_table(out)
    assert table.column_names == list(ROW_FIELDS) and not (tmp_path / "captions.parquet.parts").exists()
    rows = {os.path.basename(r["path"]): r for r in table.to_pylist()}
    assert sorted(rows) == ["broken.png", "empty.wav", "speech.wav"] and table.num_rows == 3
    assert rows["empty.wav"]["error"] == "empty file (0 bytes)"
    for name, kind in (("broken.png", "image"), ("speech.wav", "audio")):
        ref = oracle(d / name, kind, DEFAULT_PROMPTS[kind], MAX_TOKENS)
        assert rows[name]["error"] is None and rows[name]["caption"] == ref.text, name

    assert main(argv + ["--resume"]) == 0  # nothing left: no Ray job at all
    assert f"caption: nothing to do, all 3 files are in {out} already" in capfd.readouterr().err
    assert pq.read_table(out).num_rows == 3

    (tmp_path / "file").write_text("x")
    assert main(["caption", str(d), "--out", str(tmp_path / "file" / "o.jsonl")]) == 2
    assert "omni caption: cannot write the output" in capfd.readouterr().err
    assert main(["caption", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file or folder" in capfd.readouterr().err
    assert main(["caption", str(d), "--out", str(tmp_path / "o.csv")]) == 2
    assert ".jsonl or .parquet" in capfd.readouterr().err


def _lines(path):
    return path.read_bytes().splitlines() if path.exists() else []


def _interrupt_when(proc, out, n_lines, sig, timeout=300):
    """Send `sig` to the `omni caption` process once `out` holds `n_lines` rows -> (its exit code, stderr)."""
    import time

    deadline = time.time() + timeout
    while len(_lines(out)) < n_lines and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
    assert len(_lines(out)) >= n_lines, f"no {n_lines} rows within {timeout} s"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_interrupted_runs_resume_to_the_whole_output(media_dir, tmp_path, oracle):
    """`omni caption` (the CLI, in a subprocess, on this module's Ray through RAY_ADDRESS) stopped by Ctrl-C, then
    resumed and stopped by SIGTERM, then resumed to the end: after every stop the output holds whole rows only, no
    path twice; the end result is one row per file with the official generate's caption. Two Gates (named pipes) keep
    each interrupted run from finishing on any machine: the first stays shut in run 1, the second until run 3."""
    import subprocess
    import sys

    import ray
    from PIL import Image, ImageDraw

    d = tmp_path / "media"
    d.mkdir()
    for i in range(4):
        im = Image.new("RGB", (84, 56), (25 * i, 255 - 25 * i, 90))
        ImageDraw.Draw(im).ellipse((4 * i, 4, 4 * i + 30, 40), fill=(250, 250, 250))
        im.save(d / f"img{i:02d}.png")
    shutil.copy(media_dir / "speech.wav", d / "speech.wav")
    shutil.copy(media_dir / "clip.mp4", d / "clip.mp4")
    png = (media_dir / "image.png").read_bytes()
    gates = [Gate(d / "m_gate.png", png), Gate(d / "zz_gate.png", png)]  # listed after img03 and after speech.wav
    total = 8
    out = tmp_path / "captions.jsonl"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [
        sys.executable,
        "-m",
        "omni.serve.cli",
        "caption",
        str(d),
        "--out",
        str(out),
        "--max-tokens",
        str(MAX_TOKENS),
        "--batch-size",
        "1",
    ]

    def start(*extra):
        return subprocess.Popen(cmd + list(extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def whole_rows():
        data = out.read_bytes()
        assert data.endswith(b"\n")  # no torn last line
        rows = [json.loads(x) for x in data.splitlines()]
        assert len({r["path"] for r in rows}) == len(rows)  # no path twice
        return rows

    rc, err = _interrupt_when(start(), out, 1, signal.SIGINT)
    assert rc == 130 and "interrupted with" in err and "--resume" in err and "Traceback" not in err, err[-3000:]
    n1 = len(whole_rows())
    assert 1 <= n1 <= total - 2  # neither gate's row

    gates[0].make_regular()
    rc, err = _interrupt_when(start("--resume"), out, n1 + 1, signal.SIGTERM)
    assert rc == 143 and f"{n1} already done (resume)" in err, err[-3000:]
    n2 = len(whole_rows())
    assert n1 < n2 <= total - 1  # the second gate is still shut

    gates[1].make_regular()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"caption: {total - n2} files, {total - n2} ok, 0 failed" in done.stderr
    rows = whole_rows()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in d.iterdir()) and len(rows) == total
    for r in rows:
        kind = r["media_type"]
        assert r["caption"] == oracle(r["path"], kind, DEFAULT_PROMPTS[kind], MAX_TOKENS).text, r["path"]


def test_caption_bench_on_tiny(tmp_path, capsys):
    """`omni bench caption` end to end on the tiny checkpoint with 4 files (on this module's Ray, as on a user's
    running one): both paths caption every file, the greedy captions agree, the ratio comes from the same run, the
    table and caption.json are written. No timing asserts beyond sanity (the machine is shared)."""
    import argparse

    from omni.serve.bench.caption import main

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
