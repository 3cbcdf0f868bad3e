"""Media loading, the front of the chain: bytes from a source under a URL policy, then decoded images (PIL),
audio (float32 mono 16 kHz) and videos (frames sampled and resized by Qwen's rules, plus their audio track).

The decoded media equal what Qwen's cookbooks feed the processor (qwen-omni-utils' `process_mm_info`; checked per
format by tests/encoders/test_media_oracle.py): images resized by `smart_resize` with PIL's bicubic filter, audio
decoded at its own rate as float, averaged to mono and resampled by librosa's soxr_hq (as `librosa.load`), video
frames picked by `smart_nframes` and resized by torchvision's antialiased bicubic resize.

Sources: raw bytes, `data:` URIs, bare base64 (OpenAI `input_audio.data`), local paths and `file://` inside
`MediaPolicy.allowed_local_media_path`, `http(s)` when `MediaPolicy.allow_http` (public addresses only, pinned).
Every failure is a `MediaError` (400 bad input, 413 over a limit) that says what was wrong; sizes are checked
before decoding (encoded bytes, image header size, container duration) and decoding stops at the first limit hit.
"""

from __future__ import annotations

import contextlib
import io
import math

import av
import numpy as np
from PIL import Image

from omni.types import INPUT_AUDIO_SAMPLE_RATE, Video
from omni.encoders.sources import FRAME_FACTOR, MediaError, MediaLimits, MediaPolicy, _over, load_bytes

__all__ = [
    "MediaLimits",
    "MediaPolicy",
    "MediaError",
    "load_bytes",
    "load_image",
    "load_audio",
    "load_video",
    "smart_resize",
]

PATCH_FACTOR = 28  # Qwen-VL: patch 14 x spatial merge 2, so frame sides are multiples of 28


# ---------------------------------------------------------------------------------------------------- images
def load_image(source, policy: MediaPolicy = MediaPolicy(), limits: MediaLimits = MediaLimits()) -> Image.Image:
    """An RGB PIL image (PNG, JPEG, WebP and whatever else PIL opens; the first frame of animations), resized as
    qwen-omni-utils' fetch_image does: sides multiples of 28, area within [image_min_pixels, image_max_pixels], PIL
    bicubic (the processor's own resize then keeps that size)."""
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
        else:
            rgb = im.convert("RGB")
        h, w = smart_resize(h, w, PATCH_FACTOR, limits.image_min_pixels, limits.image_max_pixels)
        return rgb.resize((w, h), Image.Resampling.BICUBIC)  # PIL's default filter for RGB, as fetch_image's call


def _check_frame_size(what: str, w: int, h: int, limits: MediaLimits) -> None:
    if w < 1 or h < 1:
        raise MediaError(f"{what} has no pixels ({w}x{h})")
    if w * h > limits.max_image_pixels:
        raise _over(f"{what} size", f"{w}x{h} = {w * h} pixels", limits.max_image_pixels, "max_image_pixels")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise MediaError(
            f"{what} is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.1f} is over "
            f"{limits.max_aspect_ratio:g} (max_aspect_ratio)"
        )


def _sniff(data: bytes) -> str:
    """A short name for what the bytes look like, for error messages."""
    head = data[:12]
    for magic, name in (
        (b"RIFF", "RIFF/WAV"),
        (b"fLaC", "FLAC"),
        (b"OggS", "Ogg"),
        (b"ID3", "MP3"),
        (b"\x1aE\xdf\xa3", "Matroska/WebM"),
        (b"\x89PNG", "PNG"),
        (b"\xff\xd8\xff", "JPEG"),
        (b"GIF8", "GIF"),
    ):
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
    """Decoded audio frames -> float32 mono at `sample_rate`, refusing more than `limit_s` seconds as they come.

    As `librosa.load` (the cookbook's audio path): decoded as float at the stream's own rate and channels, averaged
    to mono, then resampled once by soxr at librosa's soxr_hq (ffmpeg's own downmix and resampler differ from it by up
    to 0.02 for a 22.05 kHz WAV and 0.24 for stereo)."""

    def __init__(self, sample_rate: int, limit_s: float, limit_name: str):
        self.resampler, self.rate = None, None  # set by the first frame: planar float, its rate and layout kept
        self.sample_rate, self.limit_s, self.limit_name = sample_rate, limit_s, limit_name
        self.chunks, self.n = [], 0

    def add(self, frame) -> None:
        if self.resampler is None:
            if frame is None:
                return
            self.rate = frame.sample_rate
            self.resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
        for out in self.resampler.resample(frame):
            self.chunks.append(out.to_ndarray())  # [channels, n] float32
            self.n += out.samples
        if self.n > round(self.limit_s * self.rate):
            raise MediaError(
                f"audio is longer than the limit of {self.limit_s} s ({self.limit_name}): decoding stopped there", 413
            )

    def finish(self) -> np.ndarray:  # [n] float32
        self.add(None)  # flush the resampler
        if not self.chunks:
            return np.zeros(0, np.float32)
        y = np.concatenate(self.chunks, axis=1)
        y = np.mean(y, axis=0) if y.shape[0] > 1 else y[0]  # librosa.to_mono
        if self.rate == self.sample_rate:
            return y
        # librosa.resample(res_type="soxr_hq") itself, without importing librosa (scipy with it: seconds per process)
        import soxr

        n = int(np.ceil(y.shape[-1] * float(self.sample_rate) / self.rate))
        out = soxr.resample(y, self.rate, self.sample_rate, quality="soxr_hq")
        return np.asarray(out[:n] if len(out) >= n else np.pad(out, (0, n - len(out))), dtype=np.float32)


def _check_duration(container, what: str, limit_s: float, name: str) -> None:
    if container.duration is not None and container.duration / 1e6 > limit_s:
        raise _over(f"{what} duration", f"{container.duration / 1e6:.2f} s", f"{limit_s} s", name)


def load_audio(
    source,
    policy: MediaPolicy = MediaPolicy(),
    limits: MediaLimits = MediaLimits(),
    sample_rate: int = INPUT_AUDIO_SAMPLE_RATE,
) -> np.ndarray:
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


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> tuple[int, int]:
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


def _frame_plan(
    total: int, src_fps: float, fps: float | None, num_frames: int | None, limits: MediaLimits
) -> tuple[list[int], int, float]:
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


def load_video(
    source,
    policy: MediaPolicy = MediaPolicy(),
    limits: MediaLimits = MediaLimits(),
    fps: float | None = None,
    num_frames: int | None = None,
    with_audio: bool = True,
) -> Video:
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
    max_pixels = max(
        min(limits.video_max_pixels, limits.video_total_pixels / n_out * FRAME_FACTOR),
        int(limits.video_min_pixels * 1.05),
    )  # qwen-vl-utils' fetch_video
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
        raise _over("video duration", f"{total / src_fps:.2f} s", f"{limits.max_video_seconds} s", "max_video_seconds")
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
    -> (list of [H, W, 3] uint8, [n] float32 or None). Each kept frame is resized as qwen-vl-utils' fetch_video
    resizes its decoded frames (torchvision, bicubic, antialiased, on uint8: rounded back to uint8)."""
    import torch
    from torchvision.transforms.functional import InterpolationMode, resize

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
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # [3, H, W]
                    out = resize(rgb, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
                    frames.append(out.permute(1, 2, 0).numpy())
                    pos += 1
                i += 1
        else:
            for frame in packet.decode():
                track.add(frame)
    return frames, (track.finish() if track else None)
