"""The DiT half of Qwen2.5-Omni's token2wav, driven from outside: `Qwen2_5OmniToken2WavDiTModel.sample()` with its
initial noise passed in (so a request's noise can be drawn once, up front, and sliced per streaming window), batched
over windows of different lengths (right padding plus a key-padding mask).

Geometry (Qwen2.5-Omni, tiny and real alike): 1 codec token = `repeats` (2) mel frames; attention works on blocks of
`block_size` (24) mel frames = 12 codes; each DiT layer sees 0 or 1 block back and 0 or 1 block ahead.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

__all__ = ["draw_noise", "sample_mel"]


def draw_noise(seed: int, frames: int, mel_dim: int = 80) -> torch.Tensor:
    """The DiT's initial state for `frames` mel frames: [1, frames, mel_dim] float32 on the CPU.

    Equal to `torch.manual_seed(seed); torch.randn(1, frames, mel_dim)` (what sample() draws on a CPU model), from a
    per-request generator instead of the global RNG. On the CPU a longer draw has every shorter one as its exact prefix
    (normal_ fills in groups of 16 and mel_dim * frames is a multiple of 16), so one draw for the longest utterance
    serves every window of a stream. CUDA draws are not prefix-stable, so the noise is drawn here and moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, mel_dim, generator=g)


@contextlib.contextmanager
def _key_padding_mask(dit, lengths: torch.Tensor):
    """Mask the right padding of a ragged batch through the block-difference tensor every DiTDecoderLayer turns into its
    mask ((diff >= -look_back) & (diff <= look_ahead)): padded keys get an out-of-range difference, padded query rows
    keep their own key only (an all-masked row would make NaN). lengths: [B] valid mel frames per row."""

    def block_diff(hidden_states):  # hidden_states: [n = B or 2B (CFG: cond rows, then uncond rows), L, hidden]
        n, L = hidden_states.shape[:2]
        pos = torch.arange(L, device=hidden_states.device)
        blocks = pos // dit.block_size
        diff = (blocks[None, :] - blocks[:, None]).expand(n, L, L).clone()  # [n, L(query), L(key)]
        pad = pos[None, :] >= lengths.to(pos.device).repeat(n // lengths.numel())[:, None]  # [n, L]
        diff.masked_fill_(pad[:, None, :], 1 << 20)
        diff.masked_fill_(torch.eye(L, dtype=torch.bool, device=pos.device)[None] & pad[:, :, None], 0)
        return diff[:, None].expand(n, dit.num_attention_heads, L, L)

    dit._create_block_diff = block_diff  # the instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del dit._create_block_diff


@contextlib.contextmanager
def _speaker_encoder_once(dit):
    """The DiT runs its ECAPA speaker encoder on the same reference mel (and its CFG zeros) at every one of the ODE's
    36 evaluations: ~57% of the tiny DiT's time. Within one sample_mel call, reuse the output for an identical input
    (the same computation on the same values: bitwise the same result)."""
    enc = dit.input_embed.spk_encoder
    inner = enc.forward
    memo: list = []  # [(input, output)]: at most one entry, for this call only

    def forward(x):
        if memo and memo[0][0].shape == x.shape and torch.equal(memo[0][0], x):
            return memo[0][1]
        out = inner(x)
        memo[:] = [(x.clone(), out)]
        return out

    enc.forward = forward  # the instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del enc.forward


@torch.inference_mode()
def sample_mel(
    dit,
    cond: torch.Tensor,
    ref_mel: torch.Tensor,
    codes: torch.Tensor,
    noise: torch.Tensor,
    lengths: torch.Tensor | None = None,
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float = -1.0,
) -> torch.Tensor:
    """`Qwen2_5OmniToken2WavDiTModel.sample()` from the given initial state, batched over B windows.

    cond: [B, enc_emb_dim]; ref_mel: [B, T_ref, mel_dim] (one T_ref for the batch); codes: [B, N] long;
    noise: [B, N * repeats, mel_dim]; lengths: [B] valid mel frames per row when rows are right-padded (None: none).
    Returns mel: [B, mel_dim, N * repeats]. With B = 1, lengths None and sample()'s own noise, equal to sample()."""
    frames = codes.shape[1] * dit.repeats
    if noise.shape[:2] != (codes.shape[0], frames):
        raise ValueError(f"noise {tuple(noise.shape)} does not match codes {tuple(codes.shape)} x {dit.repeats}")
    if frames > dit.config.max_position_embeddings:
        raise ValueError(
            f"mel length {frames} exceeds the DiT's max_position_embeddings {dit.config.max_position_embeddings}"
        )
    spk = cond.unsqueeze(1).repeat(1, frames, 1)  # [B, frames, enc_emb_dim]

    def velocity(t, x):  # the ode_function of sample(), unchanged
        if guidance_scale < 1e-5:
            return dit(
                hidden_states=x,
                speaker_embedding=spk,
                condition_vector=ref_mel,
                quantized_code=codes,
                time_step=t,
                drop_audio_conditioning=False,
                drop_code=False,
                apply_cfg=False,
            )
        out = dit(
            hidden_states=x,
            quantized_code=codes,
            speaker_embedding=spk,
            condition_vector=ref_mel,
            time_step=t,
            apply_cfg=True,
        )  # [2B, frames, mel]: conditioned rows, then unconditioned rows
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * guidance_scale

    t = torch.linspace(0, 1, num_steps, device=codes.device, dtype=spk.dtype)
    if sway_coefficient is not None:
        t += sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
    ragged = lengths is not None and bool((lengths != frames).any())
    padded = _key_padding_mask(dit, lengths) if ragged and lengths is not None else contextlib.nullcontext()
    with padded, _speaker_encoder_once(dit):
        x = RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(t)[-1]  # [B, frames, mel]
    return x.permute(0, 2, 1)
