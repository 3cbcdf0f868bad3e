"""Where media bytes come from, and the rules they obey: raw bytes, `data:` URIs, bare base64 (OpenAI
`input_audio.data`), local paths and `file://` inside `MediaPolicy.allowed_local_media_path`, and `http(s)` when
`MediaPolicy.allow_http` (public addresses only, the checked address pinned for the connection). `MediaLimits` holds
every size limit of media loading; a failure is a `MediaError` (400 bad input, 413 over a limit)."""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from omni.types import InvalidRequest

__all__ = ["MediaLimits", "MediaPolicy", "MediaError", "load_bytes", "FRAME_FACTOR"]

FRAME_FACTOR = 2  # Qwen-VL temporal patch: frames go in pairs


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 50 * 2**20  # encoded size of one media item
    max_image_pixels: int = 32 * 2**20  # width * height of an image or a video frame, checked before decoding pixels
    max_aspect_ratio: float = 200.0  # longer side / shorter side (Qwen's smart_resize refuses more)
    image_min_pixels: int = 4 * 28 * 28  # per resized image (qwen-vl-utils' IMAGE_MIN_TOKEN_NUM tokens of 28x28)
    image_max_pixels: int = 16384 * 28 * 28  # per resized image (IMAGE_MAX_TOKEN_NUM)
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

    media_type: str | None = None  # omni caption: the sniffed type of the file that failed (None: unknown)

    def __init__(self, message: str, status_code: int = 400, param: str | None = None):
        super().__init__(message, param, "media_too_large" if status_code == 413 else "invalid_media")
        self.status_code = status_code


def _over(what: str, value, limit, name: str) -> MediaError:
    return MediaError(f"{what} is {value}, over the limit of {limit} ({name})", 413)


# ---------------------------------------------------------------------------------------------------- bytes
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_SPACE = re.compile(r"\s+")


def load_bytes(
    source: str | bytes | os.PathLike, policy: MediaPolicy = MediaPolicy(), limits: MediaLimits = MediaLimits()
) -> bytes:
    """The encoded bytes of a media item, whatever the source (see the module docstring)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, os.PathLike):
        data = _read_local(os.fspath(source), policy, limits)
    elif isinstance(source, str):
        s = source.strip()
        scheme = s[: s.index(":")].lower() if _SCHEME.match(s) else ""
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
        elif len(scheme) > 1 and "//" in s[: len(scheme) + 3]:
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
        raise MediaError(
            "local media paths are disabled on this server (and the source is not a data: URI, an "
            "http(s) URL or base64)"
        )
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
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global or ip.is_multicast:
            raise MediaError(
                f"media URL host {host!r} resolves to {ip}, a private/loopback/link-local address: refused"
            )
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
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.ip = ip

    def connect(self):
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


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
            conn.request(
                "GET",
                urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                headers={"User-Agent": "omni-media/1", "Accept-Encoding": "identity"},
            )
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
