"""Media loading, the front of the chain: bytes from a source under a URL policy, then decoded images (PIL),
audio (float32 mono 16 kHz) and videos (frames sampled and resized by Qwen's rules, plus their audio track).

Sources: raw bytes, `data:` URIs, bare base64 (OpenAI `input_audio.data`), local paths and `file://` inside
`MediaPolicy.allowed_local_media_path`, `http(s)` when `MediaPolicy.allow_http` (public addresses only, pinned).
Every failure is a `MediaError` (400 bad input, 413 over a limit) that says what was wrong; sizes are checked
before decoding (encoded bytes, image header size, container duration) and decoding stops at the first limit hit.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import math
import os
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from omni.types import INPUT_AUDIO_SAMPLE_RATE, InvalidRequest, Video

__all__ = ["MediaLimits", "MediaPolicy", "MediaError", "load_bytes", "load_image", "load_audio", "load_video",
           "smart_resize"]

PATCH_FACTOR = 28  # Qwen-VL: patch 14 x spatial merge 2, so frame sides are multiples of 28
FRAME_FACTOR = 2  # Qwen-VL temporal patch: frames go in pairs


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 50 * 2**20  # encoded size of one media item
    max_image_pixels: int = 32 * 2**20  # width * height of an image or a video frame, checked before decoding pixels
    max_aspect_ratio: float = 200.0  # longer side / shorter side (Qwen's smart_resize refuses more)
    max_audio_seconds: float = 600.0  # one audio item
    max_video_seconds: float = 600.0  # one video (its audio track included)
    max_video_frames: int = 768  # after sampling (Qwen's FPS_MAX_FRAMES); an odd value acts as the even one below
    video_fps: float = 2.0  # frames sampled per second (Qwen's FPS)
    video_min_frames: int = 4  # fps sampling takes at least this many frames, if the video has them (FPS_MIN_FRAMES)
    video_min_pixels: int = 128 * 28 * 28  # per resized frame (VIDEO_MIN_PIXELS): small videos are upscaled
    video_max_pixels: int = 768 * 28 * 28  # per resized frame (VIDEO_MAX_PIXELS)
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)  # all frames / 2 together: 90% of 128K tokens of 28x28

    def __post_init__(self):
        if self.max_video_frames < FRAME_FACTOR:
            raise ValueError(f"max_video_frames must be >= {FRAME_FACTOR}, got {self.max_video_frames}")


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: str | None = None  # local paths and file:// only inside this directory; None: refused
    allow_http: bool = False  # http(s) URLs only when allowed (never to private, loopback or link-local addresses)
    http_timeout_s: float = 10.0  # whole download, connect included
    http_max_redirects: int = 3  # each redirect target is checked like the first URL


class MediaError(InvalidRequest):
    """A media item could not be loaded: `status_code` 400 (bad, corrupt, wrong type, refused) or 413 (too large)."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None):
        super().__init__(message, param, "media_too_large" if status_code == 413 else "invalid_media")
        self.status_code = status_code


def _over(what: str, value, limit, name: str) -> MediaError:
    return MediaError(f"{what} is {value}, over the limit of {limit} ({name})", 413)


# ---------------------------------------------------------------------------------------------------- bytes
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_SPACE = re.compile(r"\s+")


def load_bytes(source: str | bytes | os.PathLike, policy: MediaPolicy = MediaPolicy(),
               limits: MediaLimits = MediaLimits()) -> bytes:
    """The encoded bytes of a media item, whatever the source (see the module docstring)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, os.PathLike):
        data = _read_local(os.fspath(source), policy, limits)
    elif isinstance(source, str):
        s = source.strip()
        scheme = s[:s.index(":")].lower() if _SCHEME.match(s) else ""
        if not s:
            raise MediaError("media source is an empty string")
        if scheme == "data":
            data = _data_uri(s, limits)
        elif scheme in ("http", "https"):
            if not policy.allow_http:
                raise MediaError("http(s) media URLs are disabled on this server; send the media as a data: URI")
            data = _fetch_http(s, policy, limits)
        elif scheme == "file":
            parts = urllib.parse.urlsplit(s)
            if parts.netloc not in ("", "localhost"):
                raise MediaError(f"file:// URL with a remote host ({parts.netloc!r}) is not supported")
            data = _read_local(urllib.parse.unquote(parts.path), policy, limits)
        elif len(scheme) > 1 and "//" in s[:len(scheme) + 3]:
            raise MediaError(f"unsupported media URL scheme {scheme!r} (use data:, http(s): or file:)")
        elif _is_base64(s):
            data = _b64decode(s, "base64 media", limits)
        else:
            data = _read_local(s, policy, limits)
    else:
        raise MediaError(f"unsupported media source type {type(source).__name__}")
    if not data:
        raise MediaError("media is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise _over("media", f"{len(data)} bytes", limits.max_bytes, "max_bytes")
    return data


def _is_base64(s: str) -> bool:
    """Bare base64 or a path? Base64's alphabet holds '/', so a string starting with '/' is base64 only when it
    decodes to a JPEG or MPEG-audio header (0xFF 0xD8 / frame sync 0xFF 0xE0+): '/9j/...' or '//s...'."""
    compact = _SPACE.sub("", s)
    if not _BASE64.match(compact) or len(compact) % 4 == 1:
        return False
    if not compact.startswith("/"):
        return True
    head = base64.b64decode(compact[:4])
    return head[0] == 0xFF and (head[1] == 0xD8 or head[1] & 0xE0 == 0xE0)


def _b64decode(payload: str, what: str, limits: MediaLimits) -> bytes:
    compact = _SPACE.sub("", payload)
    if len(compact) * 3 // 4 > limits.max_bytes + 2:  # 4 base64 characters carry 3 bytes: refuse before decoding
        raise _over(what, f"about {len(compact) * 3 // 4} bytes", limits.max_bytes, "max_bytes")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{what} is not valid base64: {e}") from None


def _data_uri(s: str, limits: MediaLimits) -> bytes:
    header, comma, payload = s[5:].partition(",")
    if not comma:
        raise MediaError("malformed data: URI (no ',' between the header and the data)")
    if header.lower().endswith(";base64"):
        return _b64decode(payload, "data: URI", limits)
    if len(payload) > 3 * limits.max_bytes:  # percent-encoding takes at most 3 characters a byte
        raise _over("data: URI", f"{len(payload)} characters", limits.max_bytes, "max_bytes")
    return urllib.parse.unquote_to_bytes(payload)


def _read_local(path: str, policy: MediaPolicy, limits: MediaLimits) -> bytes:
    if policy.allowed_local_media_path is None:
        raise MediaError("local media paths are disabled on this server (and the source is not a data: URI, an "
                         "http(s) URL or base64)")
    root = os.path.realpath(policy.allowed_local_media_path)
    real = os.path.realpath(os.path.join(root, path))  # symlinks and '..' resolved before the check
    if os.path.commonpath([root, real]) != root:
        raise MediaError(f"media path {path!r} is outside the allowed media directory")
    try:
        with open(real, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_bytes:
                raise _over(f"media file {path!r}", f"{size} bytes", limits.max_bytes, "max_bytes")
            return f.read(limits.max_bytes + 1)
    except OSError as e:
        raise MediaError(f"cannot read media file {path!r}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------------- http(s)
def _public_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, all of them public, else MediaError (no SSRF into the private network)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"cannot resolve media URL host {host!r}: {e}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global or ip.is_multicast:
            raise MediaError(f"media URL host {host!r} resolves to {ip}, a private/loopback/link-local address: "
                             "refused")
    if not addresses:
        raise MediaError(f"media URL host {host!r} has no address")
    return addresses


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, not to a fresh DNS answer (no DNS rebinding)."""

    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self):
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self):
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _fetch_http(url: str, policy: MediaPolicy, limits: MediaLimits, resolve=_public_addresses) -> bytes:
    """GET with the size limit, one deadline for the whole download and checked redirects."""
    deadline = time.monotonic() + policy.http_timeout_s
    for _ in range(policy.http_max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme.lower() == "https"
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise MediaError(f"invalid media URL {url!r}")
        try:
            port = parts.port or (443 if https else 80)
        except ValueError as e:
            raise MediaError(f"invalid media URL {url!r}: {e}") from None
        ip = resolve(parts.hostname, port)[0]
        conn = (_PinnedHTTPS if https else _PinnedHTTP)(parts.hostname, port, ip, policy.http_timeout_s)
        try:
            conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                         headers={"User-Agent": "omni-media/1", "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise MediaError(f"fetching the media URL gave HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > limits.max_bytes:
                raise _over("media URL content", f"{length} bytes", limits.max_bytes, "max_bytes")
            chunks, n = [], 0
            while chunk := resp.read(min(1 << 16, limits.max_bytes + 1 - n) or 1):
                chunks.append(chunk)
                n += len(chunk)
                if n > limits.max_bytes:
                    raise _over("media URL content", f"over {limits.max_bytes} bytes", limits.max_bytes, "max_bytes")
                if time.monotonic() > deadline:
                    raise MediaError(f"media URL download took over {policy.http_timeout_s} s (http_timeout_s)")
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(f"cannot fetch the media URL: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
    raise MediaError(f"media URL redirected more than {policy.http_max_redirects} times")


# ---------------------------------------------------------------------------------------------------- images
def load_image(source, policy: MediaPolicy = MediaPolicy(), limits: MediaLimits = MediaLimits()) -> Image.Image:
    """An RGB PIL image (PNG, JPEG, WebP and whatever else PIL opens; the first frame of animations), not resized."""
    data = load_bytes(source, policy, limits)
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large: {e} (max_image_pixels)", 413) from None
    except Exception as e:
        raise MediaError(f"not a decodable image ({_sniff(data)}): {e}") from None
    w, h = im.size
    _check_frame_size("image", w, h, limits)
    with _decode_errors(f"{im.format} image"):
        im.load()
        if im.mode == "RGBA":  # as qwen-vl-utils' to_rgb: transparent pixels become white
            rgb = Image.new("RGB", im.size, (255, 255, 255))
            rgb.paste(im, mask=im.getchannel("A"))
            return rgb
        return im.convert("RGB")


def _check_frame_size(what: str, w: int, h: int, limits: MediaLimits) -> None:
    if w < 1 or h < 1:
        raise MediaError(f"{what} has no pixels ({w}x{h})")
    if w * h > limits.max_image_pixels:
        raise _over(f"{what} size", f"{w}x{h} = {w * h} pixels", limits.max_image_pixels, "max_image_pixels")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise MediaError(f"{what} is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.1f} is over "
                         f"{limits.max_aspect_ratio:g} (max_aspect_ratio)")


def _sniff(data: bytes) -> str:
    """A short name for what the bytes look like, for error messages."""
    head = data[:12]
    for magic, name in ((b"RIFF", "RIFF/WAV"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"ID3", "MP3"),
                        (b"\x1aE\xdf\xa3", "Matroska/WebM"), (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"),
                        (b"GIF8", "GIF")):
        if head.startswith(magic):
            return f"looks like {name}, {len(data)} bytes"
    if head[4:8] == b"ftyp":
        return f"looks like MP4, {len(data)} bytes"
    return f"{len(data)} bytes starting {head[:8].hex()}"


# ---------------------------------------------------------------------------------------------------- audio
_IMAGE_DEMUXERS = ("image2", "gif", "apng", "webp")  # plus every '*_pipe' (png_pipe, jpeg_pipe, ...)


@contextlib.contextmanager
def _decode_errors(what: str):
    """Whatever PIL or ffmpeg raise while decoding untrusted bytes becomes a 400 that names the media."""
    try:
        yield
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"corrupt or truncated {what}: {type(e).__name__}: {e}") from None


def _open(data: bytes, what: str):
    _check_riff_size(data, what)
    try:
        return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except Exception as e:
        raise MediaError(f"not a decodable {what} file ({_sniff(data)}): {e}") from None


def _check_riff_size(data: bytes, what: str) -> None:
    """A WAV/AVI declares its size: fewer bytes than that is a truncated file (ffmpeg would quietly play it short)."""
    if data[:4] == b"RIFF" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared < 0x7FFF0000:  # streamed writers put 0x7FFFFFFF / 0xFFFFFFFF there
            raise MediaError(f"truncated {what} file: the RIFF header declares {declared} bytes, got {len(data)}")


def _real_streams(streams):
    return [s for s in streams if not s.disposition & av.stream.Disposition.attached_pic]  # not cover art


class _AudioTrack:
    """Decoded audio frames -> float32 mono at `sample_rate`, refusing more than `limit_s` seconds as they come."""

    def __init__(self, sample_rate: int, limit_s: float, limit_name: str):
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        self.sample_rate, self.limit_s, self.limit_name = sample_rate, limit_s, limit_name
        self.chunks, self.n = [], 0

    def add(self, frame) -> None:
        for out in self.resampler.resample(frame):
            self.chunks.append(out.to_ndarray().reshape(-1))  # [1, n] float32 planar mono
            self.n += out.samples
        if self.n > round(self.limit_s * self.sample_rate):
            raise MediaError(f"audio is longer than the limit of {self.limit_s} s ({self.limit_name}): decoding "
                             "stopped there", 413)

    def finish(self) -> np.ndarray:  # [n] float32
        self.add(None)  # flush the resampler
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)


def _check_duration(container, what: str, limit_s: float, name: str) -> None:
    if container.duration is not None and container.duration / 1e6 > limit_s:
        raise _over(f"{what} duration", f"{container.duration / 1e6:.2f} s", f"{limit_s} s", name)


def load_audio(source, policy: MediaPolicy = MediaPolicy(), limits: MediaLimits = MediaLimits(),
               sample_rate: int = INPUT_AUDIO_SAMPLE_RATE) -> np.ndarray:
    """[n] float32 mono at `sample_rate` (WAV, FLAC, MP3, OGG and what ffmpeg reads; a video file's audio track)."""
    data = load_bytes(source, policy, limits)
    with _open(data, "audio") as container:
        streams = _real_streams(container.streams.audio)
        if not streams:
            raise MediaError(f"no audio stream in the {container.format.name} file ({_sniff(data)})")
        _check_duration(container, "audio", limits.max_audio_seconds, "max_audio_seconds")
        track = _AudioTrack(sample_rate, limits.max_audio_seconds, "max_audio_seconds")
        with _decode_errors(f"{container.format.name} audio"):
            for frame in container.decode(streams[0]):
                track.add(frame)
            wav = track.finish()
    if wav.size == 0:
        raise MediaError(f"the {container.format.name} file holds no audio samples")
    return wav


# ---------------------------------------------------------------------------------------------------- video
def _floor_even(n: float) -> int:
    return int(math.floor(n / FRAME_FACTOR)) * FRAME_FACTOR


def smart_resize(height: int, width: int, factor: int = PATCH_FACTOR, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _frame_plan(total: int, src_fps: float, fps: float | None, num_frames: int | None,
                limits: MediaLimits) -> tuple[list[int], int, float]:
    """-> (source frame indices to keep, output frame count (even: the last is repeated), effective fps).

    qwen-vl-utils' smart_nframes: by fps, total / src_fps * fps frames, at least video_min_frames, at most
    max_video_frames and the source's count, rounded down to even; or exactly `num_frames` (capped, then padded to
    even). Indices are spread uniformly (linspace, rounded); fps = sampled frames / source duration (Qwen's
    sample_fps)."""
    cap = _floor_even(limits.max_video_frames)
    if num_frames is not None:
        n = min(num_frames, total, cap)
    else:
        n = total / src_fps * fps
        n = min(max(n, math.ceil(limits.video_min_frames / FRAME_FACTOR) * FRAME_FACTOR), total, cap)
        n = max(_floor_even(n), min(total, FRAME_FACTOR))
    indices = np.linspace(0, total - 1, n).round().astype(int).tolist()
    return indices, n + n % FRAME_FACTOR, n * src_fps / total


def load_video(source, policy: MediaPolicy = MediaPolicy(), limits: MediaLimits = MediaLimits(),
               fps: float | None = None, num_frames: int | None = None, with_audio: bool = True) -> Video:
    """A Video: frames [T, H, W, 3] uint8 sampled (at `fps`, default limits.video_fps, or exactly `num_frames`,
    which wins when both are given) and resized by Qwen's rules; its audio track as float32 mono 16 kHz (MP4,
    WebM, MKV and what ffmpeg reads)."""
    if num_frames is not None and num_frames < 1:
        raise MediaError(f"num_frames must be >= 1, got {num_frames}", param="num_frames")
    fps = limits.video_fps if fps is None else fps
    if not fps > 0:
        raise MediaError(f"video fps must be > 0, got {fps}", param="fps")
    data = load_bytes(source, policy, limits)
    with _open(data, "video") as container:
        fmt, streams, (height, width), total, src_fps = _probe_video(container, data, limits, with_audio)
    indices, n_out, eff_fps = _frame_plan(total, src_fps, None if num_frames else fps, num_frames, limits)
    max_pixels = max(min(limits.video_max_pixels, limits.video_total_pixels / n_out * FRAME_FACTOR),
                     int(limits.video_min_pixels * 1.05))  # qwen-vl-utils' fetch_video
    size = smart_resize(height, width, PATCH_FACTOR, limits.video_min_pixels, max_pixels)
    with _open(data, "video") as container:  # the probe read to the end: decode from a fresh container
        vs, audio = [container.streams[i] for i in streams] + [None] * (2 - len(streams))
        with _decode_errors(f"{fmt} video"):
            frames, wav = _decode_video(container, vs, audio, indices, size, limits)
    if not frames:
        raise MediaError(f"no decodable frames in the {fmt} video")
    frames += [frames[-1]] * (n_out - len(frames))  # a short decode or an odd count: repeat the last frame
    return Video(frames=np.stack(frames), fps=eff_fps, audio=wav if wav is not None and wav.size else None)


def _probe_video(container, data: bytes, limits: MediaLimits, with_audio: bool):
    """Checks before decoding -> (format, [video stream index] + [audio stream index], (height, width),
    frame count, source fps)."""
    fmt = container.format.name
    if fmt in _IMAGE_DEMUXERS or fmt.endswith("_pipe"):
        raise MediaError(f"expected a video, got an image ({fmt}, {_sniff(data)})")
    videos = _real_streams(container.streams.video)
    if not videos:
        raise MediaError(f"no video stream in the {fmt} file ({_sniff(data)})")
    vs = videos[0]
    audio = (_real_streams(container.streams.audio) or [None])[0] if with_audio else None
    width, height = vs.codec_context.width, vs.codec_context.height
    _check_frame_size("video frame", width, height, limits)
    _check_duration(container, "video", limits.max_video_seconds, "max_video_seconds")
    with _decode_errors(f"{fmt} video"):
        total, end_s = _count_frames(container, vs)
    if total == 0:
        raise MediaError(f"the {fmt} video has no frames")
    rate = vs.average_rate or vs.guessed_rate
    src_fps = float(rate) if rate else total / max(end_s, 1e-3)
    if total / src_fps > limits.max_video_seconds:
        raise _over("video duration", f"{total / src_fps:.2f} s", f"{limits.max_video_seconds} s",
                    "max_video_seconds")
    declared = container.duration / 1e6 if container.duration else None
    if declared and fmt.split(",")[0] in ("matroska", "mov") and end_s < 0.9 * declared - 0.1:  # muxer-written
        raise MediaError(f"truncated {fmt} video: it declares {declared:.2f} s, its streams end at {end_s:.2f} s")
    return fmt, [vs.index] + ([audio.index] if audio is not None else []), (height, width), total, src_fps


def _count_frames(container, vs) -> tuple[int, float]:
    """-> (video frames, seconds where the last stream ends), from a demux pass (no decoding)."""
    total, end_s = 0, 0.0
    start = container.start_time / 1e6 if container.start_time else 0.0
    for packet in container.demux():
        if packet.size == 0 or packet.pts is None:
            continue
        if packet.stream.index == vs.index:
            total += 1
        end_s = max(end_s, float((packet.pts + (packet.duration or 0)) * packet.time_base) - start)
    return total, end_s


def _decode_video(container, vs, audio, indices: list[int], size: tuple[int, int], limits: MediaLimits):
    """One pass: keep (and resize) the frames at `indices`, stop decoding video after the last; decode all audio.
    -> (list of [H, W, 3] uint8, [n] float32 or None)."""
    h, w = size
    frames, pos, i = [], 0, 0
    track = _AudioTrack(INPUT_AUDIO_SAMPLE_RATE, limits.max_video_seconds, "max_video_seconds") if audio else None
    for packet in container.demux(*[s for s in (vs, audio) if s is not None]):
        if packet.stream.index == vs.index:
            if pos == len(indices):
                if track is None:
                    break  # every frame wanted is in, and no audio to read
                continue
            for frame in packet.decode():
                if pos < len(indices) and indices[pos] == i:
                    frames.append(np.asarray(frame.to_image().resize((w, h), Image.Resampling.BICUBIC)))
                    pos += 1
                i += 1
        else:
            for frame in packet.decode():
                track.add(frame)
    return frames, (track.finish() if track else None)
