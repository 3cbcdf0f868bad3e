"""What the two golden oracles share (omni/reference.py for Qwen2.5-Omni, omni/reference_qwen3.py for Qwen3-Omni):
their result type and the teacher-forced official Thinker."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from omni.types import AUDIO_SAMPLE_RATE

__all__ = ["ReferenceResult", "teacher_forced_thinker"]


@dataclass
class ReferenceResult:
    token_ids: list[int]  # generated text ids (EOS included when generated)
    text: str  # decoded, special tokens skipped
    codec_ids: list  # Qwen2.5: codec ids (stop code included when generated); Qwen3: frames [n][16]; [] for text only
    waveform: Optional[np.ndarray]  # [n] float32, 24 kHz; None for text only
    prompt_ids: list[int]
    sample_rate: int = AUDIO_SAMPLE_RATE


@contextlib.contextmanager
def teacher_forced_thinker(model, inputs, reply_ids: list[int]):
    """The official Thinker fed a reply known in advance: `thinker.generate` replaced by one forward over
    [prompt, g_0 .. g_{N-2}] (the official thinker's own forward: media merge, TMRoPE), its hidden states cut into the
    per-step layout `generate` returns (step 0: the prompt; step k: the position where g_{k-1} is the input), so the
    rest of the official `generate` (the Talker's inputs, the Talker, token2wav) runs unchanged on them."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    thinker = model.thinker
    L = inputs["input_ids"].shape[1]
    fed = torch.tensor([reply_ids[:-1]], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)

    def generate(input_ids=None, **kw):
        media = {
            k: v
            for k, v in kw.items()
            if k
            in (
                "pixel_values",
                "pixel_values_videos",
                "image_grid_thw",
                "video_grid_thw",
                "input_features",
                "feature_attention_mask",
                "video_second_per_grid",
                "use_audio_in_video",
            )
        }
        full = torch.cat([input_ids, fed], dim=1)
        out = thinker(input_ids=full, attention_mask=torch.ones_like(full), output_hidden_states=True, **media)
        hs = out.hidden_states  # (layers + 1) x [1, L + N - 1, H]
        steps = [tuple(h[:, :L] for h in hs)] + [
            tuple(h[:, L + k - 1 : L + k] for h in hs) for k in range(1, len(reply_ids))
        ]
        seqs = torch.cat([input_ids, torch.tensor([reply_ids], dtype=input_ids.dtype, device=input_ids.device)], 1)
        return GenerateDecoderOnlyOutput(sequences=seqs, hidden_states=tuple(steps))

    thinker.generate = generate
    try:
        yield
    finally:
        del thinker.generate
