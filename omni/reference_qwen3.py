"""The golden oracle for Qwen3-Omni: one chat request through the official
`Qwen3OmniMoeForConditionalGeneration.generate`, unchanged; its arguments chosen as below (each one commented).
`omni.reference.reference_generate` dispatches here for a Qwen3 checkpoint.

What the official path does, checked against the transformers 5.23/5.24 code (omni/talker_qwen3.py follows it):
- the thinker's EOS defaults to 151645 (the real `<|im_end|>`), so the checkpoint's own EOS ids are passed;
- `speaker` is looked up lower-cased in `talker_config.speaker_id`;
- the talker returns codebook 0 only; the 15 residual codebooks of each frame come from its code predictor and
  travel in `hidden_states[i][-1]` (`residual_codes`): captured here as the frames [n_frames][16]. A frame is complete
  only once the next talker step ran its code predictor, so a talker that stops at `max_new_tokens` without EOS
  leaves its last codebook-0 id without a frame (n_frames = talker steps - 1 either way; EOS 2150 is no frame);
- the code predictor samples when the talker samples (top_k 50, top_p 0.8, its generation_config's temperature),
  from the same global RNG, interleaved: talker code 0 of frame k, then the 15 residuals of frame k;
- the waveform is `code2wav.chunked_decode(frames, chunk_size=300, left_context_size=25)`: one pass for up to 300
  frames (24 s).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from omni.reference_base import ReferenceResult, teacher_forced_thinker
from omni.reference_inputs import official_inputs
from omni.types import ChatRequest, SamplingParams, check_voice

__all__ = ["reference_generate_qwen3"]


def _stage_kwargs(prefix: str, p: SamplingParams) -> dict:
    kw: dict[str, Any] = {f"{prefix}do_sample": not p.greedy, f"{prefix}repetition_penalty": p.repetition_penalty}
    if p.greedy:  # generate passes its own sampling defaults; greedy must override them (no warper is built)
        kw.update({f"{prefix}top_k": None, f"{prefix}top_p": None, f"{prefix}temperature": None})
    else:
        kw.update(
            {
                f"{prefix}temperature": p.temperature,
                f"{prefix}top_p": p.top_p,
                f"{prefix}top_k": p.top_k if p.top_k > 0 else 0,
            }
        )  # 0 disables HF's top-k
    return kw


@contextlib.contextmanager
def _capture_frames(model, sink: list):
    """Record the frames [n_frames, 16] of the talker's generate (generate returns only text ids and the wav)."""
    talker = model.talker
    orig = talker.generate

    def generate(*args, **kw):
        out = orig(*args, **kw)
        residual = [h[-1] for h in out.hidden_states if h[-1] is not None]  # each [1, 16]: one complete frame
        sink.append(torch.cat(residual).tolist() if residual else [])
        return out

    talker.generate = generate  # the instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del talker.generate


@torch.inference_mode()
def reference_generate_qwen3(loaded, request: ChatRequest, seed: int = 0, forced_reply_ids=None):
    """Run `request` through the official Qwen3-Omni generate. Sampling draws from the global RNG, seeded with `seed`
    (or the thinker's seed when set) before the call. forced_reply_ids (speech only): the Thinker's reply is these
    ids (the official Thinker teacher-forced over them, omni.reference_base), the Talker speaks it.
    -> omni.reference_base.ReferenceResult (codec_ids: frames)."""
    model, processor = loaded.model, loaded.processor
    inputs = official_inputs(processor, request).to(model.device)
    prompt_len = inputs["input_ids"].shape[1]
    th = request.sampling
    eos = model.thinker.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    kw = dict(
        use_audio_in_video=request.use_audio_in_video,
        thinker_max_new_tokens=th.max_tokens,
        thinker_eos_token_id=eos + [i for i in th.stop_token_ids if i not in eos],
        **_stage_kwargs("thinker_", th),
    )
    torch.manual_seed(th.seed if th.seed is not None else seed)
    decode = processor.tokenizer.decode
    if not request.speak:
        seqs = model.generate(**inputs, return_audio=False, **kw)
        seqs = getattr(seqs, "sequences", seqs)
        ids = seqs[0, prompt_len:].tolist()
        return ReferenceResult(ids, decode(ids, skip_special_tokens=True), [], None, inputs["input_ids"][0].tolist())
    check_voice(request.voice, loaded.voices)
    tk = request.talker_sampling
    kw.update(
        speaker=request.voice, return_audio=True, talker_max_new_tokens=tk.max_tokens, **_stage_kwargs("talker_", tk)
    )
    if tk.stop_token_ids:
        kw["talker_eos_token_id"] = [model.config.talker_config.codec_eos_token_id] + list(tk.stop_token_ids)
    frames: list = []
    forced = (
        teacher_forced_thinker(model, inputs, forced_reply_ids)
        if forced_reply_ids is not None
        else contextlib.nullcontext()
    )
    with _capture_frames(model, frames), forced:
        seqs, wav = model.generate(**inputs, **kw)
    ids = seqs[0, prompt_len:].tolist()
    return ReferenceResult(
        ids,
        decode(ids, skip_special_tokens=True),
        frames[0],
        wav.reshape(-1).float().cpu().numpy(),
        inputs["input_ids"][0].tolist(),
    )
