"""Our media loaders against an implementation this project did not write: qwen-omni-utils' `process_mm_info`, what
Qwen's cookbooks decode media with (omni/reference_inputs.py runs it for the golden oracle). For each kind and format
the decoded pixels, samples and frames are equal, or differ by a measured amount that is explained here; then the
processor's inputs (prompt ids with use_audio_in_video, pixels, features, TMRoPE time per grid) built by the
processor's own chat template from the cookbook's media equal the ones our prompt building gives."""

import logging
import subprocess

import numpy as np
import pytest
import torch

from omni.prompt import prepare_prompt, processor_inputs
from omni.reference_inputs import cookbook_request, official_inputs
from omni.types import AudioPart, ChatRequest, ImagePart, Message, TextPart, VideoPart
from omni.encoders.media import MediaLimits, MediaPolicy, _frame_plan, load_audio, load_image, load_video

INT16_STEP = 1 / 32768


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *map(str, args)], check=True, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def files(media):
    """tests/encoders/conftest.py's media, plus the speech as WAV at 8, 44.1 and 48 kHz, a 500x375 JPEG and two more
    videos: 1 s at 10 fps (fps sampling's minimum of 4 frames moves the sample fps to 4) and 640x360 (a downscale)."""
    d = media["raw.wav"].parent
    out = dict(media)
    for rate in (8000, 44100, 48000):
        out[f"speech{rate}.wav"] = d / f"speech{rate}.wav"
        _ffmpeg("-i", media["raw.wav"], "-ac", 1, "-ar", rate, out[f"speech{rate}.wav"])
    out["short.mkv"] = d / "short.mkv"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=160x120:rate=10",
        "-t",
        1,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        out["short.mkv"],
    )
    out["photo.jpg"] = d / "photo.jpg"  # 500x375: resized (the 96x64 image lands on 84x56 either way)
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=500x375", "-frames:v", 1, out["photo.jpg"])
    out["wide.mp4"] = d / "wide.mp4"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=25",
        "-t",
        2,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        out["wide.mp4"],
    )
    return out


@pytest.fixture(scope="module")
def policy(files):
    return MediaPolicy(allowed_local_media_path=str(files["raw.wav"].parent))


def _cookbook(kind: str, path, use_audio_in_video: bool = False):
    """The one media item of a one-part conversation, as cookbook_request (process_mm_info) decodes it."""
    req = cookbook_request([{"role": "user", "content": [{"type": kind, kind: str(path)}]}], use_audio_in_video)
    return getattr(req.messages[0].content[0], kind)


@pytest.mark.parametrize("name", ["image.png", "image.jpg", "image.webp", "rgba.png", "photo.jpg"])
def test_image_pixels_equal_the_cookbooks(files, policy, name):
    """Resized by PIL as fetch_image resizes (before: left to the processor's torchvision resize, which put the
    photo's pixel values up to 0.015 away, normalised, from the cookbook's)."""
    ref = _cookbook("image", files[name])
    ours = load_image(name, policy)
    expected = {"rgba.png": (56, 56), "photo.jpg": (504, 364)}.get(name, (84, 56))  # smart_resize: multiples of 28
    assert ours.size == ref.size == expected
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize(
    "name", ["speech8000.wav", "speech.wav", "speech44100.wav", "speech48000.wav", "speech.flac", "stereo.flac"]
)
def test_audio_samples_equal_the_cookbooks(files, policy, name):
    """22.05 kHz for speech.{wav,flac}; stereo.flac is 44.1 kHz, 2 channels (averaged to mono, as librosa)."""
    ref = _cookbook("audio", files[name])
    ours = load_audio(name, policy)
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", ["speech.mp3", "speech.ogg"])
def test_lossy_audio_differs_only_by_its_decoder(files, policy, name):
    """librosa.load reads MP3 and Ogg Vorbis through libsndfile (mpg123, libvorbis), we through ffmpeg's own
    decoders: the same samples, gapless trimming included, to float rounding (measured max abs after resampling:
    8.9e-7 for MP3, 2.4e-7 for Vorbis)."""
    ref = _cookbook("audio", files[name])
    ours = load_audio(name, policy)
    assert ours.shape == ref.shape
    assert 0 < np.abs(ours - ref).max() <= 2e-6


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.mkv", "counter.mkv", "short.mkv", "wide.mp4"])
def test_video_frames_sizes_and_times_equal_the_cookbooks(files, policy, name):
    """The frames picked (fps sampling: smart_nframes, linspace indices), their size (smart_resize with the video
    budget) and pixels (torchvision's antialiased bicubic), and the sample fps (the time between frames)."""
    from qwen_omni_utils import process_mm_info

    conv = [{"role": "user", "content": [{"type": "video", "video": str(files[name])}]}]
    _, _, [(frames, meta)], kw = process_mm_info(
        conv, use_audio_in_video=False, return_video_kwargs=True, return_video_metadata=True
    )
    ours = load_video(name, policy)
    ref = _cookbook("video", files[name])
    assert ours.frames.shape == ref.frames.shape and ours.frames.shape[1:3] == tuple(frames.shape[2:])
    assert np.array_equal(ours.frames, ref.frames)
    assert ours.fps == ref.fps == meta["fps"] * len(meta["frames_indices"]) / meta["total_num_frames"]
    indices, n, _ = _frame_plan(meta["total_num_frames"], meta["fps"], MediaLimits().video_fps, None, MediaLimits())
    assert indices == list(meta["frames_indices"]) and n == len(indices)
    expected = {"short.mkv": (4, 4.0), "wide.mp4": (4, 2.0)}.get(name, (6, 2.0))  # (frames, sample fps)
    assert (len(ours.frames), ours.fps) == expected
    if name == "wide.mp4":
        assert ours.frames.shape[1:3] == (364, 644)  # 640x360 -> the nearest multiples of 28 within the budget


@pytest.mark.parametrize("name", ["clip.mkv", "clip.mp4"])
def test_video_audio_track_equals_the_cookbooks(files, policy, name):
    """FLAC in Matroska: equal. AAC in MP4: the cookbook reads a video's track through the ffmpeg command line
    (audioread) as 16-bit integers, we decode floats; 11 of 61440 source samples round the other way, which
    leaves less than one 16-bit step after resampling (measured 2.1e-5)."""
    ref = _cookbook("video", files[name], use_audio_in_video=True).audio
    ours = load_video(name, policy).audio
    assert ours.shape == ref.shape
    if name == "clip.mkv":
        assert np.array_equal(ours, ref)
    else:
        assert 0 < np.abs(ours - ref).max() < INT16_STEP


def test_webm_opus_track_starts_where_ffmpeg_cli_starts_it(files, policy):
    """A known difference that stays: on this Opus track (first packet at -3 ms) the ffmpeg command line, the
    cookbook's reader, starts 156 samples at 48 kHz later than the frames libavcodec decodes for us through PyAV:
    3.25 ms, 52 samples at 16 kHz. Aligned, the two tracks agree to under one 16-bit step."""
    ref = _cookbook("video", files["clip.webm"], use_audio_in_video=True).audio
    ours = load_video("clip.webm", policy).audio
    assert len(ours) - len(ref) == 52
    assert np.abs(ours[52:] - ref).max() < INT16_STEP


def _requests(files, policy, use_audio_in_video: bool):
    """(ours, the cookbook's): image, audio and video (with its track when use_audio_in_video) and a question."""
    names = {"image": "image.jpg", "audio": "speech.wav", "video": "clip.mkv"}  # a FLAC track: equal samples
    conv = [
        {
            "role": "user",
            "content": [{"type": k, k: str(files[v])} for k, v in names.items()]
            + [{"type": "text", "text": "What do you see and hear?"}],
        }
    ]
    ours = ChatRequest(
        [
            Message(
                "user",
                [
                    ImagePart(load_image(names["image"], policy)),
                    AudioPart(load_audio(names["audio"], policy)),
                    VideoPart(load_video(names["video"], policy)),
                    TextPart("What do you see and hear?"),
                ],
            )
        ],
        use_audio_in_video=use_audio_in_video,
    )
    return ours, cookbook_request(conv, use_audio_in_video)


@pytest.mark.parametrize("use_audio_in_video", [False, True], ids=["separate", "audio-in-video"])
@pytest.mark.parametrize("model", ["tiny", "tiny_qwen3"])
def test_prompt_and_processor_inputs_equal_the_cookbooks(files, policy, request, model, use_audio_in_video):
    """The processor's own chat template over the cookbook's conversation and media (the oracle's inputs) against
    our prompt building over our media: the same prompt ids (with use_audio_in_video: the video's frames and its
    track interleaved in 2 s chunks), pixels, features and seconds per temporal grid."""
    processor = request.getfixturevalue(model).processor
    ours, ref = _requests(files, policy, use_audio_in_video)
    a, b = processor_inputs(processor, ours), official_inputs(processor, ref)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert prepare_prompt(processor, ours).input_ids.tolist() == b["input_ids"][0].tolist()  # its fast audio padding
    switches = processor.tokenizer.decode(b["input_ids"][0]).count("<|VIDEO|><|AUDIO|>")  # video chunk -> audio chunk
    assert switches == ({"tiny": 2, "tiny_qwen3": 3}[model] if use_audio_in_video else 0)  # measured: 3 s, 2 s chunks


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """The messages transformers logs meanwhile (its logger does not propagate), warning_once's memory cleared."""
    handler, log = _Records(), logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)


def test_no_pixel_cap_warning_on_a_video_request(tiny, files, policy, transformers_warnings):
    video = load_video("clip.mkv", policy)
    req = ChatRequest([Message("user", [VideoPart(video), TextPart("What happens?")])])
    processor_inputs(tiny.processor, req)  # the pipeline's
    official_inputs(tiny.processor, req)  # the oracle's
    assert not [m for m in transformers_warnings if "cap_pixels_per_frame" in m]
    tiny.processor.video_processor([video.frames])  # left unset, it warns: the control
    assert [m for m in transformers_warnings if "cap_pixels_per_frame" in m]


@pytest.mark.parametrize("tokens", [128000, 400])
def test_pixel_cap_is_the_cookbooks_budget(tiny, files, tokens):
    """cap_pixels_per_frame=True sizes raw frames as fetch_video does: each frame within an even share of the whole
    video's budget (90% of `tokens` 28x28 patches: qwen-vl-utils' total_pixels, the processor's max_video_tokens),
    between the per-frame bounds of 128 and 768 patches. The 4 frames of a 2 s clip never meet the default budget
    (128K tokens); a small one (400) shows the cap biting: 360x640 frames go to 280x476, as the cookbook's do, where
    the processor left uncapped makes them 364x644."""
    import av
    from qwen_omni_utils.v2_5.vision_process import fetch_video

    cookbook = fetch_video({"video": str(files["wide.mp4"]), "total_pixels": tokens * 784 * 0.9})
    with av.open(str(files["wide.mp4"])) as c:
        raw = [f.to_ndarray(format="rgb24") for _, f in zip(range(len(cookbook)), c.decode(video=0))]
    raw = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2).float()  # [4, 3, 360, 640]
    size = {"shortest_edge": 128 * 784, "longest_edge": 768 * 784}  # the Omni processors' video bounds

    def processor_size(**kw):
        _, h, w = tiny.processor.video_processor([raw], size=size, **kw)["video_grid_thw"][0].tolist()
        return h * 14, w * 14

    capped = processor_size(cap_pixels_per_frame=True, max_video_tokens=tokens)
    assert capped == tuple(cookbook.shape[2:]) == ((364, 644) if tokens == 128000 else (280, 476))
    assert processor_size(cap_pixels_per_frame=False, max_video_tokens=tokens) == (364, 644)
