"""`omni caption` without Ray, the input side: which files to caption, what each one is (sniffed from its bytes),
its decoded media and the request sent for it. The output side is serve/caption_output.py; the Ray Data job
serve/cluster/caption.py.

    files = list_inputs(["media/", "@more.txt", "one.png"])      # [InputFile(path, rel)], one per file
    media_type, media = load_file(path, use_audio_in_video)    # sniffed from the bytes; MediaError if it cannot be
    request = caption_request(media_type, media, prompt, ...)  # the conversation `omni chat --image F PROMPT` sends

Output rows, one per input file: `CaptionRow` (its fields are the JSON keys and the Parquet columns, ROW_FIELDS).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from omni.types import DEFAULT_VOICE, AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart, VideoPart

__all__ = [
    "CaptionRow",
    "ROW_FIELDS",
    "DEFAULT_PROMPTS",
    "CaptionError",
    "InputFile",
    "list_inputs",
    "sniff_media_type",
    "load_file",
    "caption_request",
    "one_line",
]


@dataclass(frozen=True)
class CaptionRow:
    """One output row per input file, as written to JSON lines and Parquet (serve/caption_output.py)."""

    path: str  # absolute path: the row's key (resume matches on it)
    media_type: Optional[str]  # image | audio | video; None when the content is none of them
    caption: str  # "" when error is set
    prompt: str
    num_tokens: int  # caption tokens generated
    seconds: float  # summed per-file seconds of the job's stages
    model: str
    error: Optional[str]  # None, or a one-line reason

    @classmethod
    def of(cls, row: CaptionRow | dict) -> CaptionRow:
        """A row, typed: a dict's keys beyond the fields are dropped, numpy scalars (Ray batches) become Python
        values, "" is None for media_type and error."""
        if isinstance(row, CaptionRow):
            return row
        r = {k: row.get(k) for k in ROW_FIELDS}

        def text(k: str) -> str:
            return "" if r[k] is None else str(r[k])

        def optional(k: str) -> Optional[str]:
            return None if r[k] is None or r[k] == "" else str(r[k])

        return cls(
            path=text("path"),
            media_type=optional("media_type"),
            caption=text("caption"),
            prompt=text("prompt"),
            num_tokens=int(r["num_tokens"] or 0),
            seconds=round(float(r["seconds"] or 0.0), 4),
            model=text("model"),
            error=optional("error"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def arrow_schema():
        """The Parquet schema, from the fields' types."""
        import pyarrow as pa

        types = {"str": pa.string(), "Optional[str]": pa.string(), "int": pa.int64(), "float": pa.float64()}
        return pa.schema([(f.name, types[str(f.type)]) for f in fields(CaptionRow)])


ROW_FIELDS = tuple(f.name for f in fields(CaptionRow))
DEFAULT_PROMPTS = {  # when --prompt is not given
    "image": "Describe this image in one sentence.",
    "audio": "Describe this audio in one sentence.",
    "video": "Describe this video in one sentence.",
}


class CaptionError(Exception):
    """The job cannot run or finish (bad input argument, output not writable): the CLI prints it and exits non-zero."""


def one_line(text: object, limit: int = 400) -> str:
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


def load_file(path: str, use_audio_in_video: bool = False, limits=None) -> tuple[str, object]:
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
        raise fail(
            f"unsupported file: not an image, audio or video ({len(data)} bytes starting {data[:8].hex()})", None
        )
    try:
        if kind == "image":
            return kind, load_image(data, limits=limits)
        if kind == "audio":
            return kind, load_audio(data, limits=limits)
        return kind, load_video(data, limits=limits, with_audio=use_audio_in_video)
    except MediaError as e:
        raise fail(_OBJECT_REPR.sub("", str(e)), kind) from None


def caption_request(
    media_type: str,
    media,
    prompt: str,
    max_tokens: int,
    use_audio_in_video: bool = False,
    speak: bool = False,
    voice: str = DEFAULT_VOICE,
    max_speech_tokens: int = 1024,
) -> ChatRequest:
    """The conversation `omni chat --image F "PROMPT"` sends (greedy, Qwen's default system prompt added by the prompt
    builder): one user message with the media part, then the prompt text."""
    part = {"image": ImagePart, "audio": AudioPart, "video": VideoPart}[media_type](media)
    return ChatRequest(
        [Message("user", [part, TextPart(prompt)])],
        sampling=SamplingParams(max_tokens=max_tokens),
        talker_sampling=SamplingParams(max_tokens=max_speech_tokens),
        speak=speak,
        voice=voice,
        use_audio_in_video=use_audio_in_video and media_type == "video",
    )
