"""Batched encoders against the official thinker on the tiny checkpoint, with real media (espeak-ng speech, an
ffmpeg clip decoded with av, PIL images).

Tolerances: an item's embeddings from a batched call vs a one-by-one call are compared within 1e-6. They are
bitwise equal for the vision tower on the dev machine; the audio tower differs by ~6e-8 (one float32 ulp): its
convolutions run over all 1-s windows of the batch at once, and oneDNN picks its conv algorithm by batch size (a
Conv1d over [3, C, T] is not bitwise the same as over [1, C, T]). Against the official thinker's own encoder calls on
the processor's batch (same grouping), the embeddings are bitwise equal, so a thinker fed with them is token-exact.
"""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from omni.prompt import prepare_prompt, processor_inputs
from omni.types import AudioItem, AudioPart, ChatRequest, ImagePart, Message, TextPart, Video, VideoPart, VisionItem
from omni.encoders import (
    AudioEncoder,
    EncoderConfig,
    VisionEncoder,
    encode_prompt,
    encode_prompts,
    load_encoders,
    plan_batches,
)

TOL = 1e-6  # batched vs one-by-one (see the module docstring)


def close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = TOL) -> bool:
    assert [t.shape for t in a] == [t.shape for t in b]
    return all((x - y).abs().max().item() <= tol for x, y in zip(a, b))


def equal(a: list[torch.Tensor], b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def frames(media_dir) -> np.ndarray:  # [16, 112, 112, 3] uint8, 8 fps
    with av.open(str(media_dir / "clip.mp4")) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def images() -> list:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((84, 112), (224, 168), (56, 300))]


@pytest.fixture(scope="module")
def mixed(images, speech, frames) -> ChatRequest:
    """3 images, 3 audios and 2 videos, all of different sizes, in one request."""
    videos = [Video(frames[:8], fps=8.0), Video(frames[:12, :84], fps=8.0)]
    parts = (
        [TextPart("Describe all of this.")]
        + [ImagePart(im) for im in images]
        + [AudioPart(speech[:8000]), AudioPart(speech), AudioPart(speech[:23456])]
        + [VideoPart(v) for v in videos]
    )
    return ChatRequest([Message("user", parts)])


@pytest.fixture(scope="module")
def av_request(speech, frames) -> ChatRequest:
    """2 videos with their own audio tracks (use_audio_in_video) and a plain audio between them."""
    videos = [Video(frames[:8], fps=8.0, audio=speech[:16000]), Video(frames[4:16, :84], fps=8.0, audio=speech[:30000])]
    parts = [VideoPart(videos[0]), AudioPart(speech[:12345]), VideoPart(videos[1]), TextPart("What happens?")]
    return ChatRequest([Message("user", parts)], use_audio_in_video=True)


@pytest.fixture(scope="module")
def mixed_prompt(tiny, mixed):
    return prepare_prompt(tiny.processor, mixed)


@pytest.fixture(scope="module")
def av_prompt(tiny, av_request):
    return prepare_prompt(tiny.processor, av_request)


@pytest.fixture(scope="module")
def encoders(tiny):
    """The tiny model's own towers (default config: no dtype/device change to the shared model)."""
    towers = tiny.model.thinker.model
    return VisionEncoder(towers.visual), AudioEncoder(towers.audio_tower)


@pytest.fixture(scope="module")
def official(tiny):
    """The official thinker's encoder calls on the processor's batch: request -> (images, videos, audios) tuples."""
    model = tiny.model.thinker.model

    @torch.no_grad()
    def run(request):
        x = processor_inputs(tiny.processor, request)
        images = (
            model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output
            if "pixel_values" in x
            else ()
        )
        videos = (
            model.get_video_features(x["pixel_values_videos"], x["video_grid_thw"]).pooler_output
            if "pixel_values_videos" in x
            else ()
        )
        audios = ()
        if "input_features" in x:
            flat = model.get_audio_features(x["input_features"], x["feature_attention_mask"]).last_hidden_state
            _, n_tokens = model.audio_tower._get_feat_extract_output_lengths(x["feature_attention_mask"].sum(-1))
            audios = torch.split(flat, n_tokens.tolist())
        return images, videos, audios

    return run


def placeholder_counts(input_ids: torch.Tensor, token_id: int, bos_id: int) -> list[int]:
    """Placeholder tokens of each item: the `token_id`s after each `bos_id` (with use_audio_in_video a video's
    audio tokens are interleaved with its frames' tokens, inside <|vision_bos|><|audio_bos|> ... )."""
    item = torch.cumsum(input_ids == bos_id, 0)
    counts = torch.bincount(item[input_ids == token_id])
    return [int(c) for c in counts if c > 0]


def test_mixed_request_sizes_differ(mixed_prompt):
    p = mixed_prompt
    assert len({tuple(i.grid_thw.tolist()) for i in p.images}) == 3
    assert len({tuple(v.grid_thw.tolist()) for v in p.videos}) == 2 and all(v.grid_thw[0] > 1 for v in p.videos)
    assert len({a.features.shape[1] for a in p.audios}) == 3 and max(a.features.shape[1] for a in p.audios) > 200


def test_batched_equals_one_by_one(mixed_prompt, encoders):
    vision, audio = encoders
    p = mixed_prompt
    for enc, items in ((vision, p.images + p.videos), (audio, p.audios)):
        batched = enc.encode(items)
        solo = [enc.encode([item])[0] for item in items]
        assert close(batched, solo)
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in batched)
    # an item's embeddings do not depend on its batch-mates' order either
    assert close(vision.encode(p.images[::-1])[::-1], vision.encode(p.images))
    assert close(audio.encode(p.audios[::-1])[::-1], audio.encode(p.audios))


def test_equals_official_thinker(mixed, mixed_prompt, encoders, official):
    vision, audio = encoders
    p = mixed_prompt
    emb = encode_prompt(p, vision, audio)
    images, videos, audios = official(mixed)
    assert equal(emb.images, images) and equal(emb.videos, videos) and equal(emb.audios, audios)
    # what the thinker's forward scatters: all items of a kind, concatenated in prompt order
    assert torch.equal(torch.cat(emb.audios), torch.cat(audios))


def test_shapes_match_placeholders(tiny, mixed_prompt, av_prompt, encoders):
    vision, audio = encoders
    cfg = tiny.model.thinker.config
    for p in (mixed_prompt, av_prompt):
        emb = encode_prompt(p, vision, audio)
        ids = p.input_ids
        vstart = cfg.vision_start_token_id
        assert [t.shape[0] for t in emb.images] == placeholder_counts(ids, cfg.image_token_id, vstart)
        assert [t.shape[0] for t in emb.videos] == placeholder_counts(ids, cfg.video_token_id, vstart)
        assert [t.shape[0] for t in emb.audios] == placeholder_counts(ids, cfg.audio_token_id, cfg.audio_start_token_id)
        assert [t.shape[0] for t in emb.images + emb.videos] == [vision.num_tokens(i) for i in p.images + p.videos]
        assert [t.shape[0] for t in emb.audios] == [audio.num_tokens(a) for a in p.audios]
        assert all(
            t.shape[1] == cfg.text_config.hidden_size == vision.out_hidden_size == audio.out_hidden_size
            for t in emb.images + emb.videos + emb.audios
        )


def test_plan_batches():
    assert plan_batches([], 4, 100) == []
    assert plan_batches([10, 20, 30], 16, 65536) == [range(0, 3)]
    assert plan_batches([10, 20, 30, 40, 50], 2, 65536) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_batches([60, 50, 10, 200, 5], 16, 100) == [range(0, 1), range(1, 3), range(3, 4), range(4, 5)]


def test_batch_limits_split_like_one_call(mixed_prompt, encoders):
    vision, audio = encoders
    p = mixed_prompt
    items = p.images + p.videos  # 48, 192, 88, 2304, 3360 patches
    whole = vision.encode(items)
    for cfg in (
        EncoderConfig(max_batch_items=2),
        EncoderConfig(max_batch_items=1),
        EncoderConfig(max_batch_tokens=250),
    ):
        assert close(VisionEncoder(vision.visual, cfg).encode(items), whole)
    whole = audio.encode(p.audios)  # 50, 397, 147 frames
    for cfg in (EncoderConfig(max_batch_items=2), EncoderConfig(max_batch_tokens=400)):
        assert close(AudioEncoder(audio.audio_tower, cfg).encode(p.audios), whole)


def test_videos_and_their_tracks_through_encode_prompts(av_request, av_prompt, encoders, official):
    """A request's videos (frames through the vision tower) and their own audio tracks (among its audios, at the
    videos' places) are the official thinker's; several requests in one batched call get their solo embeddings."""
    vision, audio = encoders
    p = av_prompt
    assert len(p.videos) == 2 and len(p.audios) == 3  # track 0, the plain audio, track 1 (prompt order)
    _, videos, audios = official(av_request)
    one = encode_prompts([p], vision, audio)[0]
    assert equal(one.videos, videos) and close(one.audios, audios)
    both = encode_prompts([p, p], vision, audio)
    assert all(close(m.videos, videos) and close(m.audios, one.audios) for m in both)
    assert encode_prompts([], vision, audio) == []


def test_bad_items_fail_loudly(encoders):
    vision, audio = encoders
    grid = torch.tensor([1, 4, 4])
    with pytest.raises(ValueError, match=r"vision item 1: pixel_values \(15, 1176\) does not match grid_thw"):
        vision.encode([VisionItem(torch.zeros(16, 1176), grid), VisionItem(torch.zeros(15, 1176), grid)])
    with pytest.raises(ValueError, match=r"audio item 0: features must be \[128, n_frames >= 1\], got \(80, 10\)"):
        audio.encode([AudioItem(torch.zeros(80, 10))])
    assert vision.encode([]) == [] and audio.encode([]) == []
    with pytest.raises(ValueError, match="max_batch_items"):
        EncoderConfig(max_batch_items=0)


def _modules(enc) -> list[str]:
    return [type(m).__name__ for v in vars(enc).values() if isinstance(v, torch.nn.Module) for m in v.modules()]


def test_from_pretrained_loads_only_the_tower(tiny, mixed_prompt):
    from safetensors import safe_open

    p = mixed_prompt
    vision, audio = VisionEncoder.from_pretrained("tiny"), AudioEncoder.from_pretrained("tiny")
    with safe_open(f"{tiny.path}/model.safetensors", "pt") as f:
        numel = {
            prefix: sum(f.get_tensor(k).numel() for k in f.keys() if k.startswith(prefix))
            for prefix in ("thinker.visual.", "thinker.audio_tower.")
        }
    for enc, prefix, tower in (
        (vision, "thinker.visual.", "Qwen2_5OmniVisionEncoder"),
        (audio, "thinker.audio_tower.", "Qwen2_5OmniAudioEncoder"),
    ):
        names = _modules(enc)
        assert names[0] == tower
        assert not [
            n for n in names if any(s in n for s in ("Talker", "Token2Wav", "DiT", "BigVGAN", "TextModel", "Thinker"))
        ]
        assert sum(t.numel() for t in (enc.visual if enc is vision else enc.audio_tower).parameters()) == numel[prefix]
    towers = tiny.model.thinker.model
    assert equal(vision.encode(p.images), VisionEncoder(towers.visual).encode(p.images))
    assert equal(audio.encode(p.audios), AudioEncoder(towers.audio_tower).encode(p.audios))
    both = load_encoders("tiny")
    assert _modules(both[0])[0] == "Qwen2_5OmniVisionEncoder"
    assert _modules(both[1])[0] == "Qwen2_5OmniAudioEncoder"


def test_bfloat16_equals_official_in_bfloat16(tiny, mixed, mixed_prompt):
    """The GPU setting's dtype path, on the CPU: a bfloat16 tower gives float32 CPU tensors equal to the bfloat16
    thinker's own encoder outputs."""
    from omni.encoders import load_thinker

    cfg = EncoderConfig(dtype="bfloat16")
    thinker = load_thinker("tiny", cfg)
    x = processor_inputs(tiny.processor, mixed)
    p = mixed_prompt
    with torch.no_grad():
        ref = thinker.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output
        ref_audio = thinker.model.get_audio_features(x["input_features"], x["feature_attention_mask"]).last_hidden_state
    vision, audio = VisionEncoder(thinker.model.visual, cfg), AudioEncoder(thinker.model.audio_tower, cfg)
    out = vision.encode(p.images)
    assert all(t.dtype == torch.float32 for t in out) and equal(out, [r.float() for r in ref])
    assert torch.equal(torch.cat(audio.encode(p.audios)), ref_audio.float())
    # a float32 tower cast by the encoder (parameters only, buffers stay float32) = one loaded in bfloat16
    cast = VisionEncoder(load_thinker("tiny", EncoderConfig()).model.visual, cfg)
    assert next(cast.visual.parameters()).dtype == torch.bfloat16 and equal(cast.encode(p.images), out)
