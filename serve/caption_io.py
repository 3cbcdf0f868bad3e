"""`omni caption` without Ray: which files to caption, what each one is, the request sent for it, and the output
file (JSON lines or Parquet) that survives interruption and resumes. The Ray Data job is serve/cluster/caption.py.

    files = list_inputs(["media/", "@more.txt", "one.png"])      # [InputFile(path, rel)], one per file
    media_type, media = load_file(path, use_audio_in_video)    # sniffed from the bytes; MediaError if it cannot be
    request = caption_request(media_type, media, prompt, ...)  # the conversation `omni chat --image F PROMPT` sends
    out = CaptionOutput("rows.jsonl"); done = out.open(resume=True, retry_errors=False); out.append(rows); out.close()

Output rows, one per input file (ROW_FIELDS): path (absolute), media_type (image|audio|video; null when the content
is none of them), caption, prompt, num_tokens, seconds, model, error (null, or a one-line reason; caption "" then).

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
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart, VideoPart

__all__ = ["ROW_FIELDS", "MEDIA_TYPES", "DEFAULT_PROMPTS", "CaptionError", "InputFile", "list_inputs",
           "sniff_media_type", "load_file", "caption_request", "one_line", "CaptionOutput", "Progress"]

ROW_FIELDS = ("path", "media_type", "caption", "prompt", "num_tokens", "seconds", "model", "error")
MEDIA_TYPES = ("image", "audio", "video")
DEFAULT_PROMPTS = {  # when --prompt is not given
    "image": "Describe this image in one sentence.",
    "audio": "Describe this audio in one sentence.",
    "video": "Describe this video in one sentence.",
}


class CaptionError(Exception):
    """The job cannot run or finish (bad input argument, output not writable): the CLI prints it and exits non-zero."""


def one_line(text: str, limit: int = 400) -> str:
    """An error message as one line of at most `limit` characters."""
    s = re.sub(r"\s+", " ", str(text)).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class InputFile:
    path: str  # absolute path: the row's key (resume matches on it)
    rel: str  # relative name under --speak DIR: the path below its folder INPUT, or the file's name


def _walk(root: Path) -> list[Path]:
    """Regular files and symlinks under `root`, recursively, sorted; hidden files and folders (.name) skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return found


def list_inputs(inputs: Iterable[str]) -> list[InputFile]:
    """INPUT arguments -> the files to caption, in order, each once. A file, a folder (recursed), or `@list.txt`
    (one path a line, relative to the list's folder; blank lines and lines starting with '#' skipped). A missing
    INPUT argument is a CaptionError; a missing path inside a list becomes an error row later (a list is data)."""
    out: dict[str, InputFile] = {}
    taken: set[str] = set()

    def add(path: Path, rel: str) -> None:
        p = os.path.abspath(path)
        if p in out:
            return
        if rel in taken:  # two inputs with one name (a.png from two folders): keep them apart under --speak
            rel = p.lstrip(os.sep)
        taken.add(rel)
        out[p] = InputFile(p, rel)

    for arg in inputs:
        if arg.startswith("@"):
            lst = Path(arg[1:])
            try:
                lines = lst.read_text().splitlines()
            except OSError as e:
                raise CaptionError(f"cannot read the list {lst}: {e.strerror or e}") from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line) if os.path.isabs(line) else lst.parent / line
                    add(p, p.name)
        elif os.path.isdir(arg):
            for p in _walk(Path(arg)):
                add(p, os.path.relpath(p, arg))
        elif os.path.lexists(arg):
            add(Path(arg), Path(arg).name)
        else:
            raise CaptionError(f"no such file or folder: {arg}")
    return list(out.values())


# ---------------------------------------------------------------------------------------------------- sniffing
def _magic(data: bytes) -> tuple[Optional[str], str]:
    """-> (media type from the first bytes alone, or None when the container must be probed; what it looks like)."""
    h = data[:16]
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "PNG"
    if h.startswith(b"\xff\xd8\xff"):
        return "image", "JPEG"
    if h[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "GIF"
    if h[:4] == b"RIFF" and h[8:12] == b"WEBP":
        return "image", "WebP"
    if h[:2] == b"BM" or h[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "BMP/TIFF"
    if h[:4] == b"RIFF" and h[8:12] == b"WAVE":
        return "audio", "WAV"
    if h[:4] == b"RIFF" and h[8:12] == b"AVI ":
        return "video", "AVI"
    if h[:4] in (b"fLaC", b"#!AM") or h[:3] == b"ID3" or (h[:4] == b"FORM" and h[8:11] == b"AIF"):
        return "audio", "FLAC/AMR/MP3/AIFF"
    if len(h) >= 2 and h[0] == 0xFF and h[1] & 0xE0 == 0xE0:  # MPEG audio frame sync / ADTS AAC
        return "audio", "MPEG audio"
    if h[4:8] == b"ftyp":
        if h[8:11] in (b"M4A", b"M4B"):
            return "audio", "M4A"
        return None, "mp4/mov"
    if h.startswith(b"\x1aE\xdf\xa3"):
        return None, "matroska/webm"
    if h.startswith(b"OggS"):
        return None, "ogg"
    if h[:3] == b"FLV" or h[:4] == b"\x00\x00\x01\xba" or (len(data) > 376 and data[0] == data[188] == 0x47):
        return "video", "FLV/MPEG-PS/MPEG-TS"
    return None, "unknown"


def sniff_media_type(data: bytes) -> Optional[str]:
    """image | audio | video from the content (never the name), or None when it is none of them. Containers that may
    hold either (MP4, Matroska/WebM, Ogg, unknown magic) are probed with ffmpeg: a video stream makes a video, an audio
    stream alone an audio. A container ffmpeg cannot open keeps the type its magic implies (MP4/Matroska: video)."""
    kind, what = _magic(data)
    if kind is not None:
        return kind
    import av

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as c:
            video = [s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            fmt = c.format.name
            if video and not (fmt in ("image2", "gif", "apng", "webp") or fmt.endswith("_pipe")):
                return "video"
            if c.streams.audio:
                return "audio"
            return "image" if video else None
    except Exception:  # noqa: BLE001 - whatever ffmpeg says, the bytes are no media it can open
        return {"mp4/mov": "video", "matroska/webm": "video", "ogg": "audio"}.get(what)


_OBJECT_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names its stream: noise in an error row


def load_file(path: str, use_audio_in_video: bool = False, limits=None) -> tuple[Optional[str], object]:
    """Read and decode one file -> (media type, decoded media: PIL image | [n] float32 16 kHz | Video). Raises
    MediaError with a one-line reason (and `.media_type`, None when unknown) when it cannot be read or decoded."""
    from omni.encoders.media import MediaError, MediaLimits, load_audio, load_image, load_video

    limits = limits or MediaLimits()

    def fail(msg: str, kind: Optional[str]) -> MediaError:
        err = MediaError(one_line(msg))
        err.media_type = kind
        return err

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_bytes:
                raise fail(f"file is {size} bytes, over the limit of {limits.max_bytes} (max_bytes)", None)
            data = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise fail(f"cannot read the file: {e.strerror or e}", None) from None
    if not data:
        raise fail("empty file (0 bytes)", None)
    kind = sniff_media_type(data)
    if kind is None:
        raise fail(f"unsupported file: not an image, audio or video ({len(data)} bytes starting "
                   f"{data[:8].hex()})", None)
    try:
        if kind == "image":
            return kind, load_image(data, limits=limits)
        if kind == "audio":
            return kind, load_audio(data, limits=limits)
        return kind, load_video(data, limits=limits, with_audio=use_audio_in_video)
    except MediaError as e:
        raise fail(_OBJECT_REPR.sub("", str(e)), kind) from None


def caption_request(media_type: str, media, prompt: str, max_tokens: int, use_audio_in_video: bool = False,
                    speak: bool = False, voice: str = "Chelsie", max_speech_tokens: int = 1024) -> ChatRequest:
    """The conversation `omni chat --image F "PROMPT"` sends (greedy, Qwen's default system prompt added by the prompt
    builder): one user message with the media part, then the prompt text."""
    part = {"image": ImagePart, "audio": AudioPart, "video": VideoPart}[media_type](media)
    return ChatRequest([Message("user", [part, TextPart(prompt)])], sampling=SamplingParams(max_tokens=max_tokens),
                       talker_sampling=SamplingParams(max_tokens=max_speech_tokens), speak=speak, voice=voice,
                       use_audio_in_video=use_audio_in_video and media_type == "video")


# ---------------------------------------------------------------------------------------------------- output
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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


def _clean(row: dict) -> dict:
    """A row with exactly ROW_FIELDS, typed (numpy scalars from Ray batches become Python values)."""
    r = {k: row.get(k) for k in ROW_FIELDS}
    r["num_tokens"] = int(r["num_tokens"] or 0)
    r["seconds"] = round(float(r["seconds"] or 0.0), 4)
    for k in ("path", "caption", "prompt", "model"):
        r[k] = "" if r[k] is None else str(r[k])
    for k in ("media_type", "error"):
        r[k] = None if r[k] is None or r[k] == "" else str(r[k])
    return r


def _parquet_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("media_type", pa.string()), ("caption", pa.string()),
                        ("prompt", pa.string()), ("num_tokens", pa.int64()), ("seconds", pa.float64()),
                        ("model", pa.string()), ("error", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


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
        return list({r["path"]: _clean(r) for r in rows}.values())

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

            return (self.path.exists() and not self.parts.exists()
                    and pq.read_metadata(self.path).num_rows == len(rows))
        if not self.path.exists():
            return False
        data = self.path.read_bytes()
        return (not data or data.endswith(b"\n")) and sum(1 for x in data.splitlines() if x.strip()) == len(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        """The output holds exactly `rows`, atomically (what was there stays if this fails half way)."""
        if self.parquet:
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(_parquet_table(rows), buf)
            _atomic_write(self.path, buf.getvalue())
            for f in self.parts.glob("*"):
                f.unlink()
            if self.parts.exists():
                self.parts.rmdir()
        else:
            _atomic_write(self.path, b"".join(_json_line(r) for r in rows))

    def append(self, rows: list[dict]) -> None:
        """Commit a batch of rows: after this returns they are on disk, whole; an interrupt before leaves none."""
        rows = [_clean(r) for r in rows]
        if not rows:
            return
        if self.parquet:
            import pyarrow.parquet as pq

            self.parts.mkdir(exist_ok=True)
            self._n_parts += 1
            name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._n_parts:06d}.parquet"
            buf = io.BytesIO()
            pq.write_table(_parquet_table(rows), buf)
            _atomic_write(self.parts / name, buf.getvalue())
        else:
            _write_all(self._fd, b"".join(_json_line(r) for r in rows))  # one write: a signal cannot split it
            os.fsync(self._fd)

    def close(self) -> None:
        """JSON lines: close the file. Parquet: merge the part files into the output (atomically)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.parquet and self.parts.exists():
            self._rewrite(self.read())


def _json_line(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


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
            print(f"caption: {self.done}/{self.total} files ({self.ok} ok, {self.failed} failed), {rate:.2f} files/s, "
                  f"ETA {eta_s}", file=self.stream, flush=True)

    def summary(self, out: str, interrupted: bool = False) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.total == 0:
            line = f"caption: nothing to do, all {self.skipped} files are in {out} already (resume)"
            print(line, file=self.stream, flush=True)
            return line
        line = (f"caption: {self.done} files, {self.ok} ok, {self.failed} failed, {self.rate():.2f} files/s in "
                f"{elapsed:.1f}s" + (f"; {self.skipped} already done (resume)" if self.skipped else "") +
                f"; wrote {out}")
        if interrupted:
            line += f"; interrupted with {self.total - self.done} files to go: run again with --resume"
        print(line, file=self.stream, flush=True)
        return line

