"""`omni caption`'s output side, without Ray: the output file (JSON lines or Parquet) that survives interruption and
resumes, the WAVs of --speak, signal handling around commits, and the progress lines.

    out = CaptionOutput("rows.jsonl"); done = out.open(resume=True, retry_errors=False); out.append(rows); out.close()

Writing: JSON lines are appended one whole batch per `os.write` (a signal cannot split it) and fsynced; a torn last
line (power loss, SIGKILL mid-write) is cut off when the file is opened again. Parquet rows go to part files written
to a temporary name and renamed, in `<out>.parts/`, merged into `<out>` (tmp + rename) by `close()` and by the next
`open()`. Resume: `open(resume=True)` rewrites the output atomically to the rows kept (one per path, the last one;
errored ones dropped with retry_errors, so the retried file's new row is its only row) and returns them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from omni.serve.caption_io import CaptionError, CaptionRow, one_line

__all__ = ["CaptionOutput", "Progress", "write_speech", "CommitGuard", "Interrupted"]


# ---------------------------------------------------------------------------------------------------- output
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parquet_table(rows: list[CaptionRow]):
    import pyarrow as pa

    return pa.Table.from_pylist([r.to_dict() for r in rows], schema=CaptionRow.arrow_schema())


class CaptionOutput:
    """The job's output file: `open` (read what is there, repair, resume), `append` (one committed batch), `close`."""

    def __init__(self, path: str):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise CaptionError(f"--out must end in .jsonl or .parquet, got {path}")
        self.parquet = suffix == ".parquet"
        self.parts = self.path.with_name(self.path.name + ".parts")  # parquet only: committed batches not merged
        self._fd: Optional[int] = None
        self._n_parts = 0

    # --------------------------------------------------------------------------------------------- reading
    def read(self) -> list[dict]:
        """Every complete row there is now, in order (a torn last JSON line is ignored), one per path (the last)."""
        rows: list[dict] = []
        if self.parquet:
            import pyarrow.parquet as pq

            files = ([self.path] if self.path.exists() else []) + sorted(self.parts.glob("part-*.parquet"))
            for f in files:
                rows += pq.read_table(f).to_pylist()
        elif self.path.exists():
            data = self.path.read_bytes()
            for line in data[: data.rfind(b"\n") + 1].splitlines():
                if line.strip():
                    rows.append(json.loads(line))
        return [r.to_dict() for r in {r["path"]: CaptionRow.of(r) for r in rows}.values()]

    # --------------------------------------------------------------------------------------------- writing
    def open(self, resume: bool, retry_errors: bool = False) -> list[dict]:
        """Prepare for appending -> the rows kept (resume), whose paths the job skips. Without resume the output
        starts empty. Raises CaptionError when the output cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume:
                try:
                    kept = self.read()
                except Exception as e:  # noqa: BLE001 - a file we cannot parse is not ours to overwrite
                    raise CaptionError(f"cannot resume from {self.path}: {one_line(e)}") from None
                if retry_errors:
                    kept = [r for r in kept if r["error"] is None]
            if not resume or not self._holds_exactly(kept):
                self._rewrite(kept)
            if not self.parquet:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise CaptionError(f"cannot write the output {self.path}: {e.strerror or e}") from None
        return kept

    def _holds_exactly(self, rows: list[dict]) -> bool:
        """True when the output already is `rows`, nothing torn, merged or dropped (then resume leaves it as it is)."""
        if self.parquet:
            import pyarrow.parquet as pq

            return self.path.exists() and not self.parts.exists() and pq.read_metadata(self.path).num_rows == len(rows)
        if not self.path.exists():
            return False
        data = self.path.read_bytes()
        return (not data or data.endswith(b"\n")) and sum(1 for x in data.splitlines() if x.strip()) == len(rows)

    def _rewrite(self, rows: Sequence[CaptionRow | dict]) -> None:
        """The output holds exactly `rows`, atomically (what was there stays if this fails half way)."""
        typed = [CaptionRow.of(r) for r in rows]
        if self.parquet:
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(_parquet_table(typed), buf)
            _atomic_write(self.path, buf.getvalue())
            for f in self.parts.glob("*"):
                f.unlink()
            if self.parts.exists():
                self.parts.rmdir()
        else:
            _atomic_write(self.path, b"".join(_json_line(r) for r in typed))

    def append(self, rows: Sequence[CaptionRow | dict]) -> None:
        """Commit a batch of rows: after this returns they are on disk, whole; an interrupt before leaves none."""
        typed = [CaptionRow.of(r) for r in rows]
        if not typed:
            return
        if self.parquet:
            import pyarrow.parquet as pq

            self.parts.mkdir(exist_ok=True)
            self._n_parts += 1
            name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._n_parts:06d}.parquet"
            buf = io.BytesIO()
            pq.write_table(_parquet_table(typed), buf)
            _atomic_write(self.parts / name, buf.getvalue())
        else:
            assert self._fd is not None, "JSON lines: open() opened the file"
            _write_all(self._fd, b"".join(_json_line(r) for r in typed))  # one write: a signal cannot split it
            os.fsync(self._fd)

    def close(self) -> None:
        """JSON lines: close the file. Parquet: merge the part files into the output (atomically)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.parquet and self.parts.exists():
            self._rewrite(self.read())


def _json_line(row: CaptionRow) -> bytes:
    return (json.dumps(row.to_dict(), ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------------------------------------------- progress
class Progress:
    """Progress lines on stderr while the job runs (files done/total, files/s, ETA; at most one per `every_s`) and the
    summary at the end."""

    def __init__(self, total: int, skipped: int = 0, every_s: float = 1.0, stream=None):
        self.total, self.skipped, self.every_s = total, skipped, every_s
        self.stream = stream or sys.stderr
        self.done = self.ok = self.failed = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._shown = -1  # files done at the last line printed

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, rows: list[dict], force: bool = False) -> None:
        for r in rows:
            self.done += 1
            self.failed += bool(r.get("error"))
        self.ok = self.done - self.failed
        now = time.perf_counter()
        if (force and self._shown != self.done) or (rows and now - self._last >= self.every_s):
            self._last, self._shown = now, self.done
            rate = self.rate()
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
            print(
                f"caption: {self.done}/{self.total} files ({self.ok} ok, {self.failed} failed), {rate:.2f} files/s, "
                f"ETA {eta_s}",
                file=self.stream,
                flush=True,
            )

    def summary(self, out: str, interrupted: bool = False) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.total == 0:
            line = f"caption: nothing to do, all {self.skipped} files are in {out} already (resume)"
            print(line, file=self.stream, flush=True)
            return line
        line = (
            f"caption: {self.done} files, {self.ok} ok, {self.failed} failed, {self.rate():.2f} files/s in "
            f"{elapsed:.1f}s" + (f"; {self.skipped} already done (resume)" if self.skipped else "") + f"; wrote {out}"
        )
        if interrupted:
            line += f"; interrupted with {self.total - self.done} files to go: run again with --resume"
        print(line, file=self.stream, flush=True)
        return line


# ---------------------------------------------------------------------------------------------------- speech, signals
def write_speech(speak_dir: Path, rows: list[dict]) -> None:
    """Each ok row's 16-bit PCM (`speech`) as speak_dir/<rel>.wav, 24 kHz mono, written to a temporary name and
    renamed (a WAV is whole or absent)."""
    from omni.serve.api.audio_io import wav_header

    for r in rows:
        if not r["error"] and len(r["speech"]):
            target = speak_dir / (r["rel"] + ".wav")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(wav_header(len(r["speech"])) + bytes(r["speech"]))
                os.replace(tmp, target)
            except OSError as e:
                raise CaptionError(f"cannot write speech {target}: {e.strerror or e}") from None


class Interrupted(BaseException):
    """SIGTERM (or SIGINT), raised in the main thread: a BaseException like KeyboardInterrupt, so that no `except
    Exception` on the way (Ray Data's iterator has some) swallows it."""


class CommitGuard:
    """SIGINT and SIGTERM stop the job (rows committed so far stay; the rest is for --resume), but never inside a
    commit: a signal that arrives while rows are being written takes effect right after. Main thread only."""

    def __init__(self):
        self.committing = False
        self.pending: Optional[int] = None
        self.previous: dict = {}

    def _handler(self, signum, frame):
        if self.committing:
            self.pending = signum
        else:
            raise Interrupted(signum)

    def __enter__(self) -> CommitGuard:
        return self.install()

    def install(self) -> CommitGuard:
        """(Again) after ray.init, whose core worker puts its own SIGTERM handler in (it dumps a stack and exits)."""
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handler)
                self.previous.setdefault(sig, previous)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def commit(self, fn: Callable[[], None]) -> None:
        self.committing = True
        try:
            fn()
        finally:
            self.committing = False
        if self.pending is not None:
            raise Interrupted(self.pending)
