"""Qwen2.5-Omni's vocoder, token2wav (codec ids -> DiT flow matching -> mel -> BigVGAN -> 24 kHz), offline and
chunked-streaming, with several requests' chunks batched into one DiT call and one BigVGAN call.

    t2w = Token2Wav.from_pretrained("tiny")
    wav = t2w.offline(codes, "Chelsie", seed=0)           # == model.token2wav(...) after torch.manual_seed(0) (CPU)
    s = t2w.open_stream("Chelsie", seed=0)                # draws the request's noise up front
    s.push(codes[:30]); pcm = t2w.step([s])[0]            # list of new PCM chunks, float32 24 kHz
    s.push(codes[30:], last=True); pcm += t2w.step([s])[0]

Geometry: 1 code = `repeats` (2) mel frames = 2 x 240 samples = 480 samples (20 ms); DiT block = 24 frames = 12 codes.
Streaming recipe (shared/probe/vocoder): chunk i owns mel frames [s, e); its DiT window is [s - past, e + future)
(past rounded down to a block boundary; the window ends at the utterance's end when that comes first), integrated from
the request's own noise slice, and only [s, e) is kept. BigVGAN runs on the kept mel with `bigvgan_context` frames of
context on the left and holds the last `bigvgan_context` frames back until the next chunk gives them right context.
The ODE makes 36 sequential DiT evaluations, so chunking is never bit-exact, only close: see MIN_STREAM_SNR_DB.
Chunks of one stream are independent given its codes, so a burst of codes becomes several windows in the same call.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from omni.checkpoint import resolve_model
from omni.types import check_voice
from omni.decoders.dit import draw_noise, sample_mel

__all__ = [
    "VocoderConfig",
    "VocoderStats",
    "MIN_STREAM_SNR_DB",
    "FIRST_CHUNK_SNR_DB",
    "LOOKAHEAD_STREAM_SNR_DB",
    "BF16_VOCODER_SNR_DB",
    "PRECISIONS",
    "snr_db",
    "Token2Wav",
    "VocoderStream",
]

# Streamed vs offline waveform, 10*log10(|offline|^2 / |streamed - offline|^2), for every schedule VocoderConfig
# accepts: measured 64-112 dB on the tiny checkpoint (~67 dB at the minimum contexts 2 back / 1 ahead, ~105 dB with
# 2 ahead); tests/decoders/test_token2wav.py sweeps the schedules.
MIN_STREAM_SNR_DB = 60.0
# The first packet alone against the same span of offline audio, tiny checkpoint, 3 utterances: with "hold" (the
# default) 57-72 dB; with first_chunk_right_context="lookahead" 40-50 dB for the first packet and 50-61 dB for the
# whole stream (its last frames were vocoded against a look-ahead mel the DiT had no future for); first_future_blocks=0
# 30-35 dB ("hold") and ~12 dB ("lookahead": no right context at all). tests/decoders/test_token2wav.py holds them.
PRECISIONS = ("float32", "tf32", "bfloat16")
# bfloat16 DiT + BigVGAN against float32, offline, the same codes and noise: measured 26.5-27.6 dB on tiny (7, 50 and
# 173 codes; tests/decoders/test_token2wav.py). bf16 keeps 8 bits of mantissa (~48 dB per op); the 36 sequential DiT
# evaluations and BigVGAN's ~30 convolutions accumulate it. A quality bound, not an exactness one: float32 stays the
# default, "tf32" is the GPU's faster choice at float32's range.
BF16_VOCODER_SNR_DB = 24.0
FIRST_CHUNK_SNR_DB = {"hold": 50.0, "lookahead": 38.0}
LOOKAHEAD_STREAM_SNR_DB = 48.0


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """10*log10(|ref|^2 / |x - ref|^2): the measure MIN_STREAM_SNR_DB bounds (inf when equal)."""
    err = float(((ref - x) ** 2).sum())
    return float("inf") if err == 0 else 10 * float(np.log10(float((ref**2).sum()) / err))


@dataclass(frozen=True)
class VocoderConfig:
    first_chunk_codes: int = 12  # codec tokens in the first chunk (240 ms of speech): time to first audio
    chunk_codes: int = 36  # codec tokens per later chunk: bigger recomputes less context (throughput)
    past_blocks: int = 2  # DiT left context, in DiT blocks (24 mel frames = 12 codes); >= 2 for MIN_STREAM_SNR_DB
    future_blocks: int = 1  # DiT look-ahead, in blocks (each chunk waits for these codes); >= 1
    # The first audio waits for first_chunk_codes + the first chunk's look-ahead codes, then (with "hold") plays only
    # first_chunk_codes * 2 - bigvgan_context mel frames (40 ms at 12 codes) until the next chunk's 60 codes are in.
    first_future_blocks: Optional[int] = None  # the first chunk's DiT look-ahead, in blocks (None: future_blocks);
    #                                            0: the first audio waits for first_chunk_codes alone
    first_chunk_right_context: str = "hold"  # BigVGAN's right context for the first chunk: "hold" (its last
    #   bigvgan_context frames wait for the next chunk) or "lookahead" (the DiT look-ahead mel: the whole first chunk
    #   at once; FIRST_CHUNK_SNR_DB bounds that chunk's audio against offline decoding)
    bigvgan_context: int = 20  # mel frames of BigVGAN context each side (>= 20); the last ones wait for the next chunk
    num_steps: int = 10  # ODE time points (official default: 9 RK4 steps = 36 DiT evaluations); 6..32
    guidance_scale: float = 0.5  # classifier-free guidance weight (official default); 0..1
    sway_coefficient: float = -1.0  # sway sampling of the ODE time points (official default)
    max_batch: int = 64  # DiT windows (or BigVGAN segments) per batched call at most
    device: str = "cpu"  # where the DiT and BigVGAN run; the noise is drawn on the CPU either way
    precision: str = "float32"  # the DiT's and BigVGAN's math: "float32" (the official path's), "tf32" (float32
    #   weights, TensorFloat-32 matmuls and convolutions on CUDA; float32 elsewhere), "bfloat16" (autocast: bf16 matmuls
    #   and convolutions, float32 weights; BF16_VOCODER_SNR_DB against float32)

    def first_window_codes(self, block_codes: int = 12) -> int:
        """Codes the first audio waits for: the first chunk and its look-ahead (block_codes: the DiT block, 24 mel
        frames = 12 codes on Qwen2.5's token2wav)."""
        ahead = self.future_blocks if self.first_future_blocks is None else self.first_future_blocks
        return self.first_chunk_codes + ahead * block_codes

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"VocoderConfig: {what}")

        need(self.first_chunk_codes >= 1, f"first_chunk_codes must be >= 1, got {self.first_chunk_codes}")
        need(
            self.chunk_codes >= 24,
            f"chunk_codes must be >= 24 (12-code chunks cost ~4x the offline DiT and come "
            f"within 4 dB of {MIN_STREAM_SNR_DB} dB), got {self.chunk_codes}",
        )
        need(
            self.past_blocks >= 2,
            f"past_blocks must be >= 2 (less misses {MIN_STREAM_SNR_DB} dB), got {self.past_blocks}",
        )
        need(self.future_blocks >= 1, f"future_blocks must be >= 1 (0 gives ~30 dB), got {self.future_blocks}")
        need(
            self.first_future_blocks is None or 0 <= self.first_future_blocks <= self.future_blocks,
            f"first_future_blocks must be in [0, future_blocks] or None, got {self.first_future_blocks}",
        )
        need(
            self.first_chunk_right_context in ("hold", "lookahead"),
            f"first_chunk_right_context must be 'hold' or 'lookahead', got {self.first_chunk_right_context!r}",
        )
        need(
            self.bigvgan_context >= 20,
            f"bigvgan_context must be >= 20 mel frames (the real BigVGAN sees 28 frames "
            f"each side; 10 gives ~40 dB), got {self.bigvgan_context}",
        )
        # fewer ODE steps or stronger guidance amplify the look-ahead error: 2 steps ~59 dB, guidance 2.0 ~62 dB
        need(6 <= self.num_steps <= 32, f"num_steps must be in [6, 32] for streaming, got {self.num_steps}")
        need(
            0 <= self.guidance_scale <= 1, f"guidance_scale must be in [0, 1] for streaming, got {self.guidance_scale}"
        )
        need(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"VocoderConfig: bad device {self.device!r}: {e}") from None


@dataclass
class VocoderStats:
    """Work counters of one Token2Wav (never shared between instances)."""

    dit_calls: int = 0  # ODE integrations (each num_steps-1 RK4 steps x 4 DiT forwards, over the whole batch)
    dit_windows: int = 0  # windows integrated (rows of those calls)
    dit_frames: int = 0  # mel frames integrated, padding included: the DiT compute
    vocoder_calls: int = 0  # BigVGAN forwards
    vocoder_frames: int = 0  # mel frames vocoded, context included


class Token2Wav:
    """The vocoder stage: offline decoding and batched chunked streaming. step() and offline() take a lock (the ragged
    batch mask is set on the DiT module for the duration of a call)."""

    def __init__(self, token2wav: torch.nn.Module, speakers: dict, config: VocoderConfig = VocoderConfig()):
        # token2wav: Qwen2_5OmniToken2WavModel
        # speakers: spk_dict.pt content {voice: {bos_token, cond [1, enc_emb_dim], ref_mel [1, T_ref, 80]}}
        self.config = config
        self.device = torch.device(config.device)
        self.model = token2wav.float().to(self.device).eval()  # the official path casts token2wav to float too
        self.dit = self.model.code2wav_dit_model
        self.bigvgan = self.model.code2wav_bigvgan_model
        self.repeats = self.dit.repeats  # mel frames per code (2)
        self.block = self.dit.block_size  # mel frames per DiT attention block (24)
        self.mel_dim = self.dit.mel_dim
        self.hop = math.prod(self.bigvgan.config.upsample_rates)  # samples per mel frame (240)
        self.samples_per_code = self.repeats * self.hop  # 480 at 24 kHz
        self.max_code = self.dit.config.num_embeds  # codec_embed has num_embeds + 1 rows
        block_codes = self.block // self.repeats  # 12
        for name in ("first_chunk_codes", "chunk_codes"):
            if getattr(config, name) % block_codes:
                raise ValueError(
                    f"VocoderConfig.{name} must be a multiple of {block_codes} codes (one DiT block), so "
                    f"every chunk ends on a block boundary and its look-ahead is whole blocks "
                    f"(unaligned: ~45 dB); got {getattr(config, name)}"
                )
        if config.first_chunk_codes * self.repeats <= config.bigvgan_context:
            raise ValueError(
                f"VocoderConfig: the first chunk ({config.first_chunk_codes} codes = "
                f"{config.first_chunk_codes * self.repeats} mel frames) must exceed bigvgan_context "
                f"({config.bigvgan_context} frames held back), or it yields no audio"
            )
        self._speakers = {
            name: (
                s["cond"].float().to(self.device),  # [1, enc_emb_dim]
                s["ref_mel"].float().to(self.device),
            )  # [1, T_ref, mel_dim]
            for name, s in speakers.items()
        }
        self._lock = threading.Lock()
        self.stats = VocoderStats()

    @classmethod
    def from_model(cls, model, config: VocoderConfig = VocoderConfig()) -> Token2Wav:
        """From a loaded Qwen2_5OmniForConditionalGeneration (its token2wav and voices)."""
        return cls(model.token2wav, model.speaker_map, config)

    @classmethod
    def from_pretrained(cls, model: str = "tiny", config: VocoderConfig = VocoderConfig()) -> Token2Wav:
        """Load only the token2wav weights (the `token2wav.` tensors of the checkpoint's safetensors, only the shards
        that hold them) and spk_dict.pt. model: a preset (`tiny`), a checkpoint directory or a hub id."""
        from safetensors import safe_open
        from transformers import Qwen2_5OmniToken2WavConfig
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel
        from transformers.utils import cached_file

        path = resolve_model(model)
        with open(cached_file(path, "config.json")) as f:
            t2w_config = Qwen2_5OmniToken2WavConfig(**json.load(f)["token2wav_config"])
        index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({file for key, file in weight_map.items() if key.startswith("token2wav.")})
        else:
            files = ["model.safetensors"]
        state = {}
        for file in files:
            with safe_open(cached_file(path, file), "pt") as st:
                state.update(
                    {k[len("token2wav.") :]: st.get_tensor(k) for k in st.keys() if k.startswith("token2wav.")}
                )
        t2w = Qwen2_5OmniToken2WavModel._from_config(t2w_config, dtype=torch.float32)
        t2w.load_state_dict(state, strict=True)
        speakers = torch.load(cached_file(path, "spk_dict.pt"), weights_only=True)
        return cls(t2w, speakers, config)

    # ------------------------------------------------------------------------------------------------ requests
    @property
    def voices(self) -> list[str]:
        return sorted(self._speakers)

    def check_codes(self, codes) -> list[int]:
        """codes: codec ids without the talker's stop code -> list of int; ValueError if one is out of range."""
        codes = [int(c) for c in codes]
        bad = [c for c in codes if not 0 <= c <= self.max_code]
        if bad:
            raise ValueError(
                f"codec ids must be in [0, {self.max_code}] (pass the talker's codes without its stop "
                f"code); got {bad[:5]}"
            )
        return codes

    def offline(self, codes: list[int], voice: str, seed: int) -> np.ndarray:
        """The whole utterance at once: wav [480 * len(codes)] float32 at 24 kHz. On the CPU, equal to the official
        `model.token2wav(codes, conditioning=cond, reference_mel=ref_mel)` run right after torch.manual_seed(seed).
        A standalone entry point, so it checks the voice (a stream trusts the composition's one check)."""
        check_voice(voice, self._speakers)
        codes = self.check_codes(codes)
        if not codes:
            return np.zeros(0, dtype=np.float32)
        cond, ref_mel = self._speakers[voice]
        noise = draw_noise(seed, len(codes) * self.repeats, self.mel_dim).to(self.device)  # [1, frames, mel]
        code_t = torch.tensor([codes], dtype=torch.long, device=self.device)  # [1, N]
        with self._lock, torch.inference_mode():
            mel = self._dit(cond, ref_mel, code_t, noise)  # [1, mel, frames]
            return self._vocode(mel)[0].numpy()

    def open_stream(self, voice: str, seed: int, max_codes: int = 4096) -> VocoderStream:
        """A new request's streaming state; its noise is drawn now for max_codes codes (regrown identically past it).
        `voice` is one of `voices` (the composition checked it where the request entered)."""
        return VocoderStream(self, voice, seed, max_codes)

    # ------------------------------------------------------------------------------------------------ batched steps
    chunked_steps = True  # step() takes chunks_per_stream (omni.decoders.loop)

    def step(self, streams: list[VocoderStream], chunks_per_stream: Optional[int] = None) -> list[list[np.ndarray]]:
        """Run every chunk that is ready in `streams` (at most `chunks_per_stream` of each, its earliest): all their DiT
        windows in one batched call (per reference-mel length and max_batch), then all their BigVGAN segments batched
        by length. Returns per stream its new PCM chunks in order (float32, 24 kHz); [] for a stream that has nothing
        ready. The chunks themselves never depend on how they were grouped into steps."""
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("step: a stream appears twice")
        for s in streams:
            if s._owner is not self:
                raise ValueError("step: a stream opened by another Token2Wav")
        with self._lock, torch.inference_mode():
            plans = [(s, w) for s in streams for w in s._windows(chunks_per_stream)]  # w = (s, e, ws, we), mel frames
            mels = self._run_windows(plans)
            segments = []  # (stream, mel_in [mel, L], skip frames, keep frames)
            for (stream, (start, end, _, _)), mel in zip(plans, mels):
                stream._add_mel(start, end, mel[:, : end - start], mel[:, end - start :])
                if (seg := stream._segment()) is not None:
                    segments.append((stream, *seg))
            for stream in streams:  # the held-back tail of a stream whose last codes added no new chunk
                if (seg := stream._segment()) is not None:
                    segments.append((stream, *seg))
            wavs = self._run_segments([seg[1] for seg in segments])
            out = {id(s): [] for s in streams}
            for (stream, _, skip, keep), wav in zip(segments, wavs):
                out[id(stream)].append(wav[skip * self.hop : (skip + keep) * self.hop].numpy())
            for s in streams:
                s._trim()
        return [out[id(s)] for s in streams]

    def _run_windows(self, plans) -> list[torch.Tensor]:
        """DiT over the planned windows; windows of one reference-mel length share calls, longest first, right-padded.
        Returns each window's mel from s on [mel_dim, we - s] (kept [s, e), then the look-ahead), in plan order."""
        result: list = [None] * len(plans)
        groups: dict[int, list[int]] = {}
        for i, (stream, _) in enumerate(plans):
            groups.setdefault(stream._ref_mel.shape[1], []).append(i)
        for idx in groups.values():
            idx.sort(key=lambda i: plans[i][1][2] - plans[i][1][3])  # longest window first
            for k in range(0, len(idx), self.config.max_batch):
                rows = idx[k : k + self.config.max_batch]
                length = max(plans[i][1][3] - plans[i][1][2] for i in rows)  # padded frames
                codes = torch.zeros(len(rows), length // self.repeats, dtype=torch.long)  # [B, length / repeats]
                noise = torch.zeros(len(rows), length, self.mel_dim)  # [B, length, mel]
                lengths = torch.tensor([plans[i][1][3] - plans[i][1][2] for i in rows])  # [B] valid frames
                for r, i in enumerate(rows):
                    stream, (_, _, ws, we) = plans[i]
                    window_codes = stream._codes[ws // self.repeats : we // self.repeats]
                    codes[r, : len(window_codes)] = torch.tensor(window_codes)
                    noise[r, : we - ws] = stream._noise_frames(ws, we)[0]
                cond = torch.cat([plans[i][0]._cond for i in rows])  # [B, enc_emb_dim]
                ref_mel = torch.cat([plans[i][0]._ref_mel for i in rows])  # [B, T_ref, mel]
                mel = self._dit(cond, ref_mel, codes.to(self.device), noise.to(self.device), lengths)
                for r, i in enumerate(rows):
                    _, (s, _, ws, we) = plans[i]
                    result[i] = mel[r, :, s - ws : we - ws]
        return result

    def _run_segments(self, mel_ins: list[torch.Tensor]) -> list[torch.Tensor]:
        """BigVGAN over mel segments [mel_dim, L_i]; equal lengths share calls (no padding: convolutions would see it).
        Returns each segment's audio [L_i * hop] on the CPU."""
        result: list = [None] * len(mel_ins)
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(mel_ins):
            groups.setdefault(m.shape[1], []).append(i)
        for idx in groups.values():
            for k in range(0, len(idx), self.config.max_batch):
                rows = idx[k : k + self.config.max_batch]
                wav = self._vocode(torch.stack([mel_ins[i] for i in rows]))  # [B, L * hop]
                for r, i in enumerate(rows):
                    result[i] = wav[r]
        return result

    def _dit(self, cond, ref_mel, codes, noise, lengths=None) -> torch.Tensor:
        c = self.config
        self.stats.dit_calls += 1
        self.stats.dit_windows += codes.shape[0]
        self.stats.dit_frames += noise.shape[0] * noise.shape[1]
        with self._precision():
            mel = sample_mel(
                self.dit,
                cond,
                ref_mel,
                codes,
                noise,
                lengths,
                num_steps=c.num_steps,
                guidance_scale=c.guidance_scale,
                sway_coefficient=c.sway_coefficient,
            )
        return mel.float()

    def _precision(self):
        """The configured math for a DiT or BigVGAN call (VocoderConfig.precision)."""
        p = self.config.precision
        if p == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if p == "tf32" and self.device.type == "cuda":
            return _tf32()
        return contextlib.nullcontext()

    def _vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: [B, mel_dim, L] -> wav [B, L * hop] float32 on the CPU (BigVGAN squeezes and moves to the CPU)."""
        self.stats.vocoder_calls += 1
        self.stats.vocoder_frames += mel.shape[0] * mel.shape[2]
        with self._precision():
            return self.bigvgan(mel).reshape(mel.shape[0], -1).float()


@contextlib.contextmanager
def _tf32():
    """TensorFloat-32 matmuls and convolutions for the duration of a call (restored after: process-wide flags)."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


class VocoderStream:
    """One request's streaming state: codes so far, the next mel frame to produce, the final mel still needed as BigVGAN
    context, the frames whose audio is out, and the request's noise and voice. Driven by Token2Wav.step."""

    def __init__(self, owner: Token2Wav, voice: str, seed: int, max_codes: int = 4096):
        self._owner, self.voice, self.seed = owner, voice, seed
        self._cond, self._ref_mel = owner._speakers[voice]  # [1, enc_emb_dim], [1, T_ref, mel]
        self._noise = draw_noise(seed, max(1, max_codes) * owner.repeats, owner.mel_dim)  # [1, frames, mel] CPU
        self._codes: list[int] = []
        self._last = False  # no more codes will come
        self._next = 0  # first mel frame the DiT has not produced
        self._mel = torch.zeros(owner.mel_dim, 0, device=owner.device)  # final mel [mel, next - mel_start]
        self._mel_start = 0  # mel frame index of self._mel[:, 0]
        self._done = 0  # mel frames whose audio has been emitted
        self._lookahead = torch.zeros(owner.mel_dim, 0, device=owner.device)  # the last window's mel past its chunk

    def push(self, codes: list[int], last: bool = False) -> None:
        """Append codec ids (WITHOUT the talker's stop code); last=True when the talker has finished."""
        if self._last:
            raise RuntimeError("push after the last codes of the stream")
        self._codes += self._owner.check_codes(codes)
        self._last = bool(last)

    @property
    def ready(self) -> bool:
        """A chunk can run now."""
        return bool(self._windows(limit=1)) or self._tail_pending()

    @property
    def receiving(self) -> bool:
        """Codes have come (its first chunk is on its way, or done)."""
        return bool(self._codes)

    @property
    def finished(self) -> bool:
        """All audio has been emitted (nothing more will come)."""
        return self._last and self._done >= len(self._codes) * self._owner.repeats

    def _windows(self, limit: int | None = None) -> list[tuple[int, int, int, int]]:
        """Chunks ready now, as (s, e, ws, we) in mel frames: keep [s, e) of the DiT window [ws, we)."""
        o, c = self._owner, self._owner.config
        total, past = len(self._codes) * o.repeats, c.past_blocks * o.block
        first_future = c.future_blocks if c.first_future_blocks is None else c.first_future_blocks
        out, s = [], self._next
        while limit is None or len(out) < limit:
            e = s + (c.first_chunk_codes if s == 0 else c.chunk_codes) * o.repeats
            future = (first_future if s == 0 else c.future_blocks) * o.block
            if self._last:
                if s >= total:
                    break
                e, we = min(e, total), min(e + future, total)  # the true end: nothing to look ahead at
            else:
                we = e + future
                if we > total:
                    break
            ws = max(0, (s - past) // o.block * o.block)  # block aligned: the DiT mask counts blocks from 0
            out.append((s, e, ws, we))
            s = e
        return out

    def _noise_frames(self, ws: int, we: int) -> torch.Tensor:
        """The request's noise for mel frames [ws, we): [1, we - ws, mel], the same as the offline draw's slice."""
        if we > self._noise.shape[1]:  # past max_codes: redraw longer (the old draw is its exact prefix)
            self._noise = draw_noise(self.seed, max(we, 2 * self._noise.shape[1]), self._owner.mel_dim)
        return self._noise[:, ws:we]

    def _add_mel(self, s: int, e: int, mel: torch.Tensor, lookahead: torch.Tensor) -> None:
        """Append the final mel [mel_dim, e - s] of the next chunk; `lookahead` [mel_dim, we - e]: its window's mel
        past e (provisional: the next chunk recomputes it with more context)."""
        assert s == self._next, (s, self._next)
        self._mel = torch.cat([self._mel, mel], 1)
        self._next = e
        self._lookahead = lookahead

    def _tail_pending(self) -> bool:
        """The talker has finished, the DiT is done, but held-back audio is still to be emitted."""
        total = len(self._codes) * self._owner.repeats
        return self._last and self._next == total and self._done < total

    def _segment(self):
        """The BigVGAN segment the final mel so far completes: (mel_in [mel_dim, L], skip frames, keep frames), or
        None when every frame not yet emitted must still wait for right context."""
        ctx, end = self._owner.config.bigvgan_context, self._next
        final = self._last and end == len(self._codes) * self._owner.repeats
        if (
            not final
            and self._done == 0
            and end > 0
            and self._mel_start == 0
            and self._owner.config.first_chunk_right_context == "lookahead"
        ):
            # the first chunk whole, the look-ahead mel as BigVGAN's right context (the next chunk's left context is
            # final mel again, so only this chunk's last frames carry the provisional error)
            self._done = end
            return torch.cat([self._mel[:, :end], self._lookahead[:, :ctx]], 1), 0, end
        a, b = self._done, end if final else end - ctx  # emit [a, b); hold [b, end) until it has right context
        if b <= a:
            return None
        lo = max(0, a - ctx)
        self._done = b
        return self._mel[:, lo - self._mel_start : end - self._mel_start], a - lo, b - a

    def _trim(self) -> None:
        """Drop final mel no later segment needs (left context reaches bigvgan_context frames before _done)."""
        keep_from = max(self._mel_start, self._done - self._owner.config.bigvgan_context)
        self._mel = self._mel[:, keep_from - self._mel_start :]
        self._mel_start = keep_from
