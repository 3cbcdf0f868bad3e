"""The golden oracle: one chat request through the official transformers `generate`, unchanged but for the
transformers 5.23+ workarounds below (each one commented). Every later stage is tested against this.

    from omni.checkpoint import load_model
    from omni.reference import reference_generate
    out = reference_generate(load_model("tiny"), request)   # out.token_ids, out.text, out.codec_ids, out.waveform

Its inputs are not the pipeline's: omni/reference_inputs.py decodes the media with qwen-omni-utils'
`process_mm_info` (what Qwen's cookbooks use) and renders the prompt with the processor's own chat template
(`cookbook_request`, `official_inputs`); the golden tests hand it the cookbook's decoding of the same files
(tests/conftest.py `cookbook`). Against it, our loaders differed (issue 20; tests/encoders/test_media_oracle.py):
images reached the processor unresized, and its torchvision resize put a 500x375 JPEG's pixels up to 0.015 from the
cookbook's PIL resize; audio went through ffmpeg's resampler and downmix, 0.019 from librosa's soxr_hq for a 22.05 kHz
WAV and 0.24 for stereo (ffmpeg scales, librosa averages); video frames were resized by PIL, up to 22/255 from
torchvision's antialiased bicubic; Qwen3's processor, resizing frames again to 32-pixel patches, rounded our uint8
frames where the cookbook's float frames are not rounded (0.097). Fixed in encoders/media.py and omni/prompt.py:
now equal for images, WAV at any rate, FLAC, video frames, their sizes and sample fps, and the prompt ids with
`use_audio_in_video`. What stays is measured there: MP3 and Vorbis decoders (< 2e-6), a video's AAC track (< one
16-bit step: the cookbook reads it as 16-bit integers through the ffmpeg command line), and a WebM/Opus track that
the ffmpeg command line starts 3.25 ms later. transformers 5.25's `cap_pixels_per_frame` is set to True on both
paths: it is qwen-vl-utils' budget (same sizes as fetch_video), and frames already resized keep their size.

The one workaround that changes results, `keep_talker_mask`, is checked against the official code left alone
(tests/omni/test_reference_mask.py, transformers 5.25): the unpatched `generate` on a left-padded batch gives, for every
row, the patched single request's text ids and codec ids, and its Talker logits to 1e-6, media rows included.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from omni.reference_base import ReferenceResult, teacher_forced_thinker
from omni.reference_inputs import official_inputs
from omni.types import ChatRequest, SamplingParams, check_voice

__all__ = ["ReferenceResult", "reference_generate", "generate_kwargs", "keep_talker_mask"]


def _stage_kwargs(prefix: str, p: SamplingParams) -> dict:
    kw: dict[str, Any] = {f"{prefix}do_sample": not p.greedy}
    if not p.greedy:
        kw[f"{prefix}temperature"] = p.temperature
        kw[f"{prefix}top_p"] = p.top_p
        kw[f"{prefix}top_k"] = p.top_k if p.top_k > 0 else 0  # 0 disables HF's top-k
    kw[f"{prefix}repetition_penalty"] = p.repetition_penalty
    return kw


def generate_kwargs(model, request: ChatRequest, has_pixels: bool = False) -> dict:
    """The keyword arguments of the official Qwen2.5 `generate` for `request` (besides the processor's inputs): the
    per-stage sampling settings, and for speech the voice and the Talker's. has_pixels: the inputs hold pixel values."""
    th = request.sampling
    kw = dict(
        use_audio_in_video=request.use_audio_in_video,
        thinker_max_new_tokens=th.max_tokens,
        **_stage_kwargs("thinker_", th),
    )
    eos = model.thinker.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if th.stop_token_ids:
        kw["thinker_eos_token_id"] = eos + [i for i in th.stop_token_ids if i not in eos]
    if not request.speak:
        return kw
    tk = request.talker_sampling
    kw.update(speaker=request.voice, talker_max_new_tokens=tk.max_tokens, **_stage_kwargs("talker_", tk))
    if tk.greedy:  # generate passes its own sampling defaults to the talker; greedy must override them
        kw.update(talker_top_k=None, talker_top_p=None, talker_temperature=None)
    if tk.stop_token_ids:
        eos = [model.talker.codec_pad_token, model.talker.codec_eos_token]
        kw["talker_eos_token_id"] = eos + list(tk.stop_token_ids)
    if has_pixels:
        # transformers 5.23 bug: generate forwards pixel values to talker.generate, whose kwarg validation rejects
        # them; a talker_-prefixed None overrides them for the talker only.
        kw.update(talker_pixel_values=None, talker_pixel_values_videos=None)
    return kw


@contextlib.contextmanager
def keep_talker_mask(model):
    """transformers 5.23-5.25 quirk: GenerationMixin.generate drops an all-ones attention mask, so for one unpadded
    request `talker.forward` skips its masked branch (no codec pad/bos embeddings in the prefill, no talker M-RoPE
    positions). This patch hands the talker the all-ones mask again, so the oracle takes the full recipe.

    Checked with the official code unpatched (transformers 5.25, tiny and small checkpoints; tests/omni/
    test_reference_mask.py keeps the tiny text and image + audio cases): wherever the mask is not all ones, `generate`
    itself takes this recipe. A left-padded batch of 2-3 requests (text; image + audio; image + audio + video with
    its track, use_audio_in_video) gives each row the patched single request's text ids and all 48 codec ids, and
    Talker logits within 1.5e-7 on tiny, 1e-6 on small (batch-size dependent kernels); so does the longest row, which
    has no padding of its own, and so does a single request with one pad token in front. The unpatched single request
    is the outlier: its Talker logits differ by ~1e-2 (tiny) / 3e-2 (small) from the first step, and on tiny its
    greedy codes part at step 14-32 (on small, whose random Talker emits near-constant codes, only the logits show
    it). So the patch changes only the one path where generate discards the mask as an optimisation, and makes it
    agree with the official code's own batched path (and, per DESIGN.md, not re-run here, transformers 4.52 and
    vllm-omni)."""
    talker = model.talker
    orig = talker.prepare_inputs_for_generation

    def prepare_inputs_for_generation(input_ids, inputs_embeds=None, **kwargs):  # **kwargs: generate validates names
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)  # input_ids: the talker sequence so far
        return orig(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    talker.prepare_inputs_for_generation = prepare_inputs_for_generation  # instance attribute shadows the method
    try:
        yield
    finally:
        del talker.prepare_inputs_for_generation


@contextlib.contextmanager
def _capture_talker_codes(model, sink: list):
    """Record the codec ids `talker.generate` returns (generate itself returns only text ids and the waveform)."""
    talker = model.talker
    orig = talker.generate

    def generate(**kw):
        out = orig(**kw)
        sink.append(out[:, kw["input_ids"].shape[1] :].clone())
        return out

    talker.generate = generate
    try:
        yield
    finally:
        del talker.generate


@torch.inference_mode()
def reference_generate(
    loaded, request: ChatRequest, seed: int = 0, forced_reply_ids: Optional[list[int]] = None
) -> ReferenceResult:
    """Run `request` through the official `generate` of the loaded model, the reference function its architecture's
    record names (Qwen2.5-Omni's below, Qwen3-Omni's in omni/reference_qwen3.py). Sampling draws from the global RNG,
    seeded with `seed` (or the thinker's seed when set) before the call. forced_reply_ids (speech only): the
    Thinker's reply is these ids (the official Thinker teacher-forced over them), the Talker speaks it."""
    return loaded.architecture.load("reference")(loaded, request, seed, forced_reply_ids)


@torch.inference_mode()
def reference_generate_qwen25(
    loaded, request: ChatRequest, seed: int = 0, forced_reply_ids: Optional[list[int]] = None
) -> ReferenceResult:
    """Qwen2.5-Omni's official `generate` (see reference_generate)."""
    model, processor = loaded.model, loaded.processor
    check_voice(request.voice, model.speaker_map)
    inputs = official_inputs(processor, request).to(model.device)
    prompt_len = inputs["input_ids"].shape[1]
    kw = generate_kwargs(model, request, has_pixels="pixel_values" in inputs or "pixel_values_videos" in inputs)
    th = request.sampling
    torch.manual_seed(th.seed if th.seed is not None else seed)
    if not request.speak:
        seqs = model.generate(**inputs, generation_mode="text", **kw)
        ids = seqs[0, prompt_len:].tolist()
        return ReferenceResult(
            ids, processor.tokenizer.decode(ids, skip_special_tokens=True), [], None, inputs["input_ids"][0].tolist()
        )
    codes: list = []
    forced = (
        teacher_forced_thinker(model, inputs, forced_reply_ids)
        if forced_reply_ids is not None
        else contextlib.nullcontext()
    )
    with keep_talker_mask(model), _capture_talker_codes(model, codes), forced:
        seqs, wav = model.generate(**inputs, **kw)
    ids = seqs[0, prompt_len:].tolist()
    return ReferenceResult(
        ids,
        processor.tokenizer.decode(ids, skip_special_tokens=True),
        codes[0][0].tolist(),
        wav.reshape(-1).float().cpu().numpy(),
        inputs["input_ids"][0].tolist(),
    )
