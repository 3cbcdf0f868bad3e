"""Media loading on real files: every format from every kind of source, Qwen's sampling and resize numbers, and
every way a client can get it wrong (MediaError with its status code and a message that says what)."""

import base64
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni.types import InvalidRequest, Video
from omni.encoders import sources as src
from omni.encoders.media import (
    MediaError,
    MediaLimits,
    MediaPolicy,
    load_audio,
    load_bytes,
    load_image,
    load_video,
    smart_resize,
)

AUDIO = ["speech.wav", "speech.flac", "speech.mp3", "speech.ogg"]
VIDEO = ["clip.mp4", "clip.webm", "clip.mkv"]
IMAGE = ["image.png", "image.jpg", "image.webp"]
MIME = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
}
SOURCES = ["bytes", "data_uri", "path", "file_url", "base64"]


@pytest.fixture(scope="module")
def policy(media):
    return MediaPolicy(allowed_local_media_path=str(media["raw.wav"].parent))


@pytest.fixture(scope="module")
def speech_seconds(media):
    info = sf.info(media["raw.wav"])
    return info.frames / info.samplerate


def source(path: Path, kind: str):
    data = path.read_bytes()
    return {
        "bytes": lambda: data,
        "data_uri": lambda: f"data:{MIME[path.suffix[1:]]};base64,{base64.b64encode(data).decode()}",
        "path": lambda: str(path),
        "file_url": lambda: path.as_uri(),
        "base64": lambda: base64.b64encode(data).decode(),
    }[kind]()


def raises(fn, status: int, *fragments: str) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn()
    err = info.value
    assert err.status_code == status, err
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"
    return err


# ---------------------------------------------------------------------------------------------------- good input
@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("name", AUDIO)
def test_audio_loads_mono_16k_with_its_duration(media, policy, speech_seconds, name, kind):
    wav = load_audio(source(media[name], kind), policy)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size / 16000 - speech_seconds) < 0.05
    assert 0.3 < np.abs(wav).max() <= 1.0


def test_audio_content_survives_decoding(media, policy):
    """Lossless formats decode to the same samples; stereo 44.1 kHz comes out as the same mono 16 kHz speech; the
    lossy ones stay close to it."""
    ref = load_audio(media["speech.wav"], policy)
    np.testing.assert_array_equal(load_audio(media["speech.flac"], policy), ref)
    stereo = load_audio(media["stereo.flac"], policy)
    n = min(stereo.size, ref.size)
    assert abs(stereo.size - ref.size) < 80 and np.corrcoef(stereo[:n], ref[:n])[0, 1] > 0.99
    for name in ("speech.mp3", "speech.ogg"):
        lossy = load_audio(media[name], policy)
        n = min(lossy.size, ref.size)
        assert np.corrcoef(lossy[:n], ref[:n])[0, 1] > 0.9, name


def test_audio_at_another_sample_rate(media, policy, speech_seconds):
    wav = load_audio(media["speech.ogg"], policy, sample_rate=24000)
    assert abs(wav.size / 24000 - speech_seconds) < 0.05


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("name", IMAGE)
def test_image_loads_rgb(media, policy, name, kind):
    im = load_image(source(media[name], kind), policy)
    assert im.mode == "RGB" and im.size == (84, 56)  # 96x64 resized by smart_resize, as fetch_image
    px = np.asarray(im).astype(int)
    assert np.abs(px[32, 10] - (200, 60, 40)).max() < 12 and np.abs(px[32, 80] - (30, 90, 220)).max() < 12


def test_transparent_pixels_become_white(media, policy):
    px = np.asarray(load_image(media["rgba.png"], policy))
    assert px.shape == (56, 56, 3)  # 32x32 upscaled to the 4-patch minimum (smart_resize)
    assert (px[:, :24] == 255).all() and (px[:, 32:] == (0, 0, 255)).all()  # halves; the edge blends (bicubic)


@pytest.mark.parametrize("kind", ["bytes", "data_uri", "path"])
@pytest.mark.parametrize("name", VIDEO)
def test_video_loads_sampled_resized_with_its_audio(media, policy, speech_seconds, name, kind):
    video = load_video(source(media[name], kind), policy)
    assert isinstance(video, Video)
    # 3 s at 10 fps = 30 frames; 2 fps -> 6 frames; 160x120 is under video_min_pixels (100352): scaled by
    # sqrt(100352 / 19200) = 2.286 and rounded up to multiples of 28 -> 280 x 392
    assert video.frames.shape == (6, 280, 392, 3) and video.frames.dtype == np.uint8
    assert video.fps == 2.0
    assert video.audio.dtype == np.float32 and abs(video.audio.size / 16000 - speech_seconds) < 0.05


def test_video_without_audio(media, policy):
    assert load_video(media["noaudio.mp4"], policy).audio is None
    assert load_video(media["clip.mp4"], policy, with_audio=False).audio is None


def _frame_indices(media, video: Video) -> list[int]:
    """Which source frame each output frame is: counter.mkv's frames differ in brightness (~8 levels apart)."""
    import av

    with av.open(str(media["counter.mkv"])) as c:
        means = np.array([f.to_ndarray(format="gray").mean() for f in c.decode(video=0)])
    return [int(np.abs(means - frame.mean()).argmin()) for frame in video.frames]


@pytest.mark.parametrize(
    "kwargs, indices, fps",
    [
        # qwen-vl-utils: nframes = 30 / 10 * fps, at least 4, even; linspace(0, 29, n).round()
        ({}, [0, 6, 12, 17, 23, 29], 2.0),
        ({"fps": 1.0}, [0, 10, 19, 29], 4 / 3),  # 3 frames -> at least 4; fps = 4 sampled / 3 s
        ({"fps": 100.0}, list(range(30)), 10.0),  # never more than the source has
        ({"num_frames": 5}, [0, 7, 14, 22, 29, 29], 5 / 3),  # exactly 5, padded to even with the last frame
        ({"num_frames": 8, "fps": 1.0}, [0, 4, 8, 12, 17, 21, 25, 29], 8 / 3),  # num_frames wins
        ({"num_frames": 1}, [0, 0], 1 / 3),
    ],
)
def test_video_frame_sampling(media, policy, kwargs, indices, fps):
    video = load_video(media["counter.mkv"], policy, **kwargs)
    assert _frame_indices(media, video) == indices
    assert video.fps == pytest.approx(fps)


def test_video_frame_cap(media, policy):
    assert len(load_video(media["counter.mkv"], policy, MediaLimits(max_video_frames=4), fps=100.0).frames) == 4
    assert len(load_video(media["counter.mkv"], policy, MediaLimits(max_video_frames=5), num_frames=9).frames) == 4


def test_video_resize_rules(media, policy):
    # per-frame maximum: 160x120 -> 112x168 rounded, over 16 x 784 = 12544 px -> scaled by sqrt(19200 / 12544),
    # sides floored to multiples of 28 -> 84 x 112
    small = MediaLimits(video_min_pixels=784, video_max_pixels=16 * 784)
    assert load_video(media["clip.mkv"], policy, small).frames.shape == (6, 84, 112, 3)
    # total budget: 6 frames share 3 x 12544 px -> 12544 per frame (x2 for the temporal pair) -> the same 84 x 112
    budget = MediaLimits(video_min_pixels=784, video_max_pixels=10**6, video_total_pixels=3 * 12544)
    assert load_video(media["clip.mkv"], policy, budget).frames.shape == (6, 84, 112, 3)


def test_smart_resize_numbers():
    assert smart_resize(120, 160, min_pixels=128 * 784, max_pixels=768 * 784) == (280, 392)
    assert smart_resize(1080, 1920, min_pixels=128 * 784, max_pixels=768 * 784) == (560, 1008)
    assert smart_resize(1080, 1920, min_pixels=128 * 784, max_pixels=235200) == (336, 644)  # 768 frames' budget
    assert smart_resize(10, 10, min_pixels=4 * 784, max_pixels=16384 * 784) == (56, 56)
    assert smart_resize(224, 224) == (224, 224)


def test_bundled_samples_load():
    root = Path(__file__).resolve().parents[2] / "assets" / "samples"
    policy = MediaPolicy(allowed_local_media_path=str(root))
    assert load_image("image.png", policy).mode == "RGB"
    assert load_audio("speech.wav", policy).size > 16000
    video = load_video("clip.mp4", policy)
    assert video.frames.shape[0] % 2 == 0 and video.audio is not None


# ---------------------------------------------------------------------------------------------------- wrong type
def test_media_error_is_an_invalid_request():
    err = MediaError("x", 413)
    assert isinstance(err, InvalidRequest) and isinstance(err, ValueError) and err.code == "media_too_large"
    assert MediaError("y").status_code == 400 and MediaError("y").code == "invalid_media"


def test_wrong_kind_of_media(media, policy):
    raises(lambda: load_image(media["speech.wav"], policy), 400, "not a decodable image", "RIFF/WAV")
    raises(lambda: load_image(media["clip.mp4"], policy), 400, "not a decodable image", "MP4")
    raises(lambda: load_video(media["image.png"], policy), 400, "expected a video, got an image", "png_pipe")
    raises(lambda: load_video(media["image.jpg"], policy), 400, "expected a video, got an image")
    raises(lambda: load_video(media["speech.wav"], policy), 400, "no video stream", "wav")
    raises(lambda: load_video(media["cover.mp3"], policy), 400, "no video stream", "mp3")  # cover art is no video
    raises(lambda: load_audio(media["image.png"], policy), 400, "no audio stream")
    raises(lambda: load_audio(media["noaudio.mp4"], policy), 400, "no audio stream")


@pytest.mark.parametrize("loader", [load_image, load_audio, load_video])
def test_garbage_and_empty(loader):
    # seeded: random bytes can happen to look like a text format ffmpeg reads ("[=" opens an lrc file)
    raises(lambda: loader(np.random.default_rng(0).bytes(4096)), 400, "not a decodable")
    raises(lambda: loader(b""), 400, "empty")
    raises(lambda: loader("  "), 400, "empty")
    raises(lambda: loader("data:audio/wav;base64,"), 400, "empty")
    raises(lambda: loader("data:image/png;base64,iVBOR@@@"), 400, "data: URI is not valid base64")
    raises(lambda: loader("data:image/png;base64"), 400, "malformed data: URI")
    raises(lambda: loader(12345), 400, "unsupported media source type int")
    raises(lambda: loader("ftp://example.com/a.png"), 400, "unsupported media URL scheme 'ftp'")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("image.png", "corrupt or truncated PNG image"),
        ("image.jpg", "looks like JPEG"),
        ("image.webp", "not a decodable image"),
        ("speech.wav", "truncated audio file: the RIFF header declares"),
        ("speech.flac", "corrupt or truncated flac audio"),
        ("clip.mp4", "not a decodable video file"),
        ("clip.webm", "truncated matroska,webm video: it declares 3.0"),
        ("clip.mkv", "truncated matroska,webm video: it declares 3.0"),
    ],
)
def test_truncated(media, name, fragment):
    data = media[name].read_bytes()[: int(media[name].stat().st_size * 0.6)]
    loader = {"image": load_image, "speech": load_audio, "clip": load_video}[name.split(".")[0]]
    raises(lambda: loader(data), 400, fragment)


# ---------------------------------------------------------------------------------------------------- limits
def test_size_limits(media, policy):
    tiny = MediaLimits(max_bytes=1000)
    raises(lambda: load_bytes(b"x" * 1001, limits=tiny), 413, "media is 1001 bytes", "1000 (max_bytes)")
    # a data: URI is refused from its length, before the base64 is decoded
    raises(lambda: load_image("data:image/png;base64," + "A" * 4000, limits=tiny), 413, "about 3000 bytes", "max_bytes")
    raises(lambda: load_audio(str(media["speech.wav"]), policy, tiny), 413, "speech.wav", "max_bytes")


def test_image_limits(media, policy):
    raises(
        lambda: load_image(media["image.png"], policy, MediaLimits(max_image_pixels=6000)),
        413,
        "96x64 = 6144 pixels",
        "6000 (max_image_pixels)",
    )
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, "PNG")  # 36 Mpx of zeros: 5 kB compressed, 108 MB once RGB
    raises(lambda: load_image(buf.getvalue()), 413, "6000x6000 = 36000000 pixels", "max_image_pixels")
    buf = io.BytesIO()
    Image.new("RGB", (402, 2)).save(buf, "PNG")
    raises(lambda: load_image(buf.getvalue()), 400, "aspect ratio 201.0 is over 200 (max_aspect_ratio)")


def test_duration_limits(media, policy):
    raises(
        lambda: load_audio(media["speech.ogg"], policy, MediaLimits(max_audio_seconds=2.0)),
        413,
        "audio duration is 2.78 s",
        "2.0 s (max_audio_seconds)",
    )
    # no declared duration (Matroska written to a pipe): refused while decoding, as soon as it passes the limit
    raises(
        lambda: load_audio(media["stream.mka"], policy, MediaLimits(max_audio_seconds=2.0)),
        413,
        "audio is longer than the limit of 2.0 s (max_audio_seconds)",
    )
    raises(
        lambda: load_video(media["clip.webm"], policy, MediaLimits(max_video_seconds=2.5)),
        413,
        "video duration is 3.01 s",
        "2.5 s (max_video_seconds)",
    )
    raises(
        lambda: load_video(media["clip.mp4"], policy, MediaLimits(max_image_pixels=19199)),
        413,
        "video frame size is 160x120 = 19200 pixels",
        "max_image_pixels",
    )


def test_bad_sampling_arguments(media, policy):
    raises(lambda: load_video(media["clip.mp4"], policy, num_frames=0), 400, "num_frames must be >= 1")
    raises(lambda: load_video(media["clip.mp4"], policy, fps=0.0), 400, "fps must be > 0")


# ---------------------------------------------------------------------------------------------------- local paths
def test_local_paths_only_inside_the_allowed_directory(media, policy, tmp_path):
    root = media["raw.wav"].parent
    outside = tmp_path / "secret.png"
    outside.write_bytes(media["image.png"].read_bytes())
    raises(lambda: load_bytes(str(outside), policy), 400, "outside the allowed media directory")
    raises(lambda: load_bytes(outside.as_uri(), policy), 400, "outside the allowed media directory")
    raises(lambda: load_bytes(str(root / ".." / outside.parent.name / "secret.png"), policy), 400, "outside")
    raises(lambda: load_bytes("../../../../etc/passwd", policy), 400, "outside the allowed media directory")
    link = root / "escape.png"
    if not link.exists():
        link.symlink_to(outside)
    raises(lambda: load_image(str(link), policy), 400, "outside the allowed media directory")
    inner = root / "inner.png"
    if not inner.exists():
        inner.symlink_to(root / "image.png")
    assert load_image(str(inner), policy).size == (84, 56)  # a symlink that stays inside is fine
    assert load_image("image.png", policy).size == (84, 56)  # relative to the allowed directory
    raises(lambda: load_bytes(str(root / "missing.png"), policy), 400, "cannot read media file", "No such file")
    raises(lambda: load_bytes(str(media["image.png"])), 400, "local media paths are disabled")
    raises(lambda: load_bytes(media["image.png"].as_uri()), 400, "local media paths are disabled")
    raises(lambda: load_bytes("file://otherhost/etc/passwd", policy), 400, "remote host")


def test_bare_base64_is_not_taken_for_a_path(media):
    """JPEG base64 starts with '/9j/': it must decode as an image, not be refused as a local path."""
    b64 = base64.b64encode(media["image.jpg"].read_bytes()).decode()
    assert b64.startswith("/9j/") and load_image(b64).size == (84, 56)
    assert load_audio(base64.b64encode(media["speech.mp3"].read_bytes()).decode()).size > 16000


# ---------------------------------------------------------------------------------------------------- http(s)
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/a.png",
        "http://localhost/a.png",
        "https://[::1]/a.png",
        "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://0.0.0.0/a.png",
    ],
)
def test_http_to_private_addresses_is_refused(url):
    raises(lambda: load_image(url, MediaPolicy(allow_http=True)), 400, "private/loopback/link-local", "refused")


def test_http_is_off_by_default():
    raises(lambda: load_image("https://example.com/a.png"), 400, "http(s) media URLs are disabled")


@pytest.fixture(scope="module")
def http_server(media):
    """A local server for the download itself (size limit, redirects, errors): reached through a resolver that
    maps the test host to 127.0.0.1, since the real resolver refuses loopback."""
    image = media["image.png"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/image.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
            elif self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", self.path.split("?to=", 1)[1])
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://media.test:{server.server_address[1]}"
    server.shutdown()


def _resolve_test_host(host, port):
    return ["127.0.0.1"] if host == "media.test" else src._public_addresses(host, port)


def test_http_download(http_server, media):
    policy, limits = MediaPolicy(allow_http=True, http_timeout_s=5), MediaLimits()
    fetch = lambda url, lim=limits: src._fetch_http(url, policy, lim, resolve=_resolve_test_host)  # noqa: E731
    assert fetch(f"{http_server}/image.png") == media["image.png"].read_bytes()
    assert fetch(f"{http_server}/redirect?to=/image.png") == media["image.png"].read_bytes()
    raises(lambda: fetch(f"{http_server}/image.png", MediaLimits(max_bytes=100)), 413, "max_bytes")
    raises(lambda: fetch(f"{http_server}/nothing"), 400, "HTTP 404")
    # a redirect is checked like the first URL: no way into loopback through it
    raises(lambda: fetch(f"{http_server}/redirect?to=http://127.0.0.1:1/x"), 400, "127.0.0.1", "refused")
