"""Qwen3-Omni's vocoder, Code2Wav (frames of 16 codebook ids -> 24 kHz), offline and streaming, several requests'
chunks batched into one call. The same stage interface as Qwen2.5's Token2Wav (decoders/token2wav.py), so the vocoder
loop (decoders/loop.py) and the "vocoder" stage of the speech chain serve either.

    c2w = Code2Wav.from_pretrained("tiny-qwen3")
    wav = c2w.offline(frames)                            # == the official generate's waveform for these frames
    s = c2w.open_stream()
    s.push(frames[:2]); pcm = c2w.step([s])[0]           # list of new PCM chunks, float32 24 kHz
    s.push(frames[2:], last=True); pcm += c2w.step([s])[0]

Geometry (`Qwen3OmniMoeCode2Wav`): one frame (80 ms, 12.5 Hz) -> 2 * 2 * 8 * 5 * 4 * 3 = 1920 samples. The model is
causal: codes embedded and averaged over the codebooks, a sliding-window causal transformer (`sliding_window` W,
L layers), then causal convolutions and transposed convolutions. Each decoder transposed convolution drops its last
input step, so N frames give N * 1920 - 555 samples (555 = (((8 + 1) * 5 + 1) * 4 + 1) * 3), and sample n depends on
frames up to (n + 555) // 1920 only: a chunk of frames [s, e) can emit every sample before e * 1920 - 555 at once and
holds back nothing but those 555 samples (23 ms), which the next chunk emits. Left, sample n depends on frames back
to n // 1920 - C with C = L * (W - 1) (transformer) + `conv_context` (about 10 frames of convolutions). A chunk
recomputes that context: the transformer over C frames, the (expensive) convolutions over `conv_context` frames
only. With the whole receptive field as context, streamed audio equals the one-pass decode up to float rounding
(MAX_STREAM_ERROR); the official `chunked_decode(chunk_size=300, left_context_size=25)` is that one pass for up to
300 frames (24 s), and `offline` is exactly it.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from omni.checkpoint import resolve_model

__all__ = ["Code2WavConfig", "Code2Wav", "Code2WavStream", "MAX_STREAM_ERROR", "receptive_field"]

# Streamed vs offline waveform, max |streamed - offline| (signal RMS ~0.15, clipped at 1), with the exact context, for
# every schedule: measured 2.5e-5 .. 5.5e-5 on the tiny checkpoint in float32 on the CPU (first chunks of 1-4 frames,
# later chunks of 1-16: the rounding of different window lengths through the convolutions; two batched streams
# differ from solo by as much), <= 1e-10 in float64 (the same arithmetic: streaming is exact).
# tests/decoders/test_code2wav.py sweeps the schedules.
MAX_STREAM_ERROR = 1e-4


def receptive_field(config) -> tuple[int, int, int]:
    """(transformer_context, conv_context, holdback): frames of left context the transformer and the convolutions
    need, and the samples at a chunk's end that wait for the next frame. From a Qwen3OmniMoeCode2WavConfig."""
    transformer = config.num_hidden_layers * (config.sliding_window - 1)
    rate, steps = 1, 0.0  # steps per frame at the current layer; left context in frames
    for factor in config.upsampling_ratios:  # transposed conv k = stride (no context), then a ConvNeXt (causal k=7)
        rate *= factor
        steps += 6 / rate
    steps += 6 / rate  # the decoder's first causal conv, k=7
    holdback = 0
    for u in config.upsample_rates:  # transposed conv k = 2u, stride u (reads one step ahead), residual units k=7
        holdback = (holdback + 1) * u
        rate *= u
        steps += 6 * (1 + 3 + 9) / rate
    steps += 6 / rate  # the last causal conv, k=7
    return transformer, math.ceil(steps) + 1, holdback


@dataclass(frozen=True)
class Code2WavConfig:
    first_chunk_frames: int = 2  # frames in the first chunk (160 ms of speech; its audio leaves 23 ms held back)
    chunk_frames: int = 8  # frames per later chunk: bigger recomputes less context (throughput)
    transformer_context_frames: Optional[int] = None  # None: L * (W - 1), the exact receptive field; fewer is
    #                                                     cheaper and approximate
    max_batch: int = 32  # windows per batched call at most
    device: str = "cpu"  # where Code2Wav runs

    def __post_init__(self):
        if self.first_chunk_frames < 1 or self.chunk_frames < 1 or self.max_batch < 1:
            raise ValueError(
                f"Code2WavConfig: first_chunk_frames, chunk_frames and max_batch must be >= 1, got "
                f"{self.first_chunk_frames}, {self.chunk_frames}, {self.max_batch}"
            )
        if self.transformer_context_frames is not None and self.transformer_context_frames < 0:
            raise ValueError(
                f"Code2WavConfig: transformer_context_frames must be >= 0, got {self.transformer_context_frames}"
            )
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"Code2WavConfig: bad device {self.device!r}: {e}") from None


@dataclass
class Code2WavStats:
    """Work counters of one Code2Wav."""

    calls: int = 0  # batched window calls (one transformer + one convolution forward each)
    windows: int = 0  # windows decoded
    transformer_frames: int = 0  # frames through the transformer, context included
    conv_frames: int = 0  # frames through the convolutions, context included


class Code2Wav:
    """The Qwen3 vocoder stage: offline decoding and batched streaming. `step` and `offline` take a lock."""

    def __init__(self, code2wav: torch.nn.Module, config: Code2WavConfig = Code2WavConfig()):
        # code2wav: Qwen3OmniMoeCode2Wav
        self.config = config
        self.device = torch.device(config.device)
        self.model = code2wav.to(self.device).eval()
        c = self.model.config
        self.groups, self.codebook = c.num_quantizers, c.codebook_size
        self.samples_per_frame = int(self.model.total_upsample)  # 1920
        t_ctx, self.conv_context, self.holdback = receptive_field(c)
        self.transformer_context = (
            t_ctx if config.transformer_context_frames is None else config.transformer_context_frames
        )
        self.exact = self.transformer_context >= t_ctx
        self._lock = threading.Lock()
        self.stats = Code2WavStats()

    @classmethod
    def from_model(cls, model, config: Code2WavConfig = Code2WavConfig()) -> Code2Wav:
        """From a loaded Qwen3OmniMoeForConditionalGeneration (its code2wav)."""
        return cls(model.code2wav, config)

    @classmethod
    def from_pretrained(
        cls, model: str = "tiny-qwen3", config: Code2WavConfig = Code2WavConfig(), dtype: Optional[torch.dtype] = None
    ) -> Code2Wav:
        """Only the `code2wav.` tensors of the checkpoint (only the shards that hold them). model: a preset, a
        checkpoint directory or a hub id of a Qwen3-Omni with speech output."""
        from safetensors import safe_open
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav
        from transformers.utils import cached_file

        path = resolve_model(model)
        with open(cached_file(path, "config.json")) as f:
            cfg = json.load(f)
        if not cfg.get("enable_audio_output", True) or "code2wav_config" not in cfg:
            raise ValueError(f"{model} has no speech output (no code2wav)")
        index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index:
            with open(index) as f:
                files = sorted({v for k, v in json.load(f)["weight_map"].items() if k.startswith("code2wav.")})
        else:
            files = ["model.safetensors"]
        state = {}
        for file in files:
            with safe_open(cached_file(path, file), "pt") as st:
                state.update({k[len("code2wav.") :]: st.get_tensor(k) for k in st.keys() if k.startswith("code2wav.")})
        net = Qwen3OmniMoeCode2Wav._from_config(
            Qwen3OmniMoeCode2WavConfig(**cfg["code2wav_config"]), dtype=dtype or torch.float32
        )
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "code_offset"]  # a non-persistent buffer
        if missing or unexpected:
            raise ValueError(f"code2wav weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return cls(net, config)

    # ------------------------------------------------------------------------------------------------ requests
    @property
    def voices(self) -> list[str]:
        return []  # Qwen3 speaks in the talker's voice: the vocoder has none of its own

    def check_codes(self, frames) -> list[list[int]]:
        """frames [n][num_quantizers] ids in [0, codebook_size) -> list of lists; ValueError otherwise."""
        out = [[int(c) for c in f] for f in frames]
        bad = [f for f in out if len(f) != self.groups or not all(0 <= c < self.codebook for c in f)]
        if bad:
            raise ValueError(f"Code2Wav frames are {self.groups} ids in [0, {self.codebook}) each; got {bad[0]}")
        return out

    def offline(self, frames, voice: str = "", seed: int = 0) -> np.ndarray:
        """The whole utterance as the official generate decodes it: `chunked_decode(frames, 300, 25)`, float32
        [n * 1920 - 555 per 300-frame chunk] at 24 kHz (voice and seed: unused, Qwen2.5's signature)."""
        frames = self.check_codes(frames)
        if not frames:
            return np.zeros(0, dtype=np.float32)
        codes = torch.tensor(frames, device=self.device).T[None]  # [1, 16, n]
        with self._lock, torch.inference_mode():
            return (
                self.model.chunked_decode(codes, chunk_size=300, left_context_size=25).reshape(-1).float().cpu().numpy()
            )

    def open_stream(self, voice: str = "", seed: int = 0, max_codes: int = 0) -> Code2WavStream:
        """A new request's streaming state (voice, seed, max_codes: unused, Qwen2.5's signature)."""
        return Code2WavStream(self)

    # ------------------------------------------------------------------------------------------------ batched steps
    chunked_steps = False  # step() decodes every ready window of each stream (no chunks_per_stream)

    def step(self, streams: list[Code2WavStream]) -> list[list[np.ndarray]]:
        """Decode every chunk that is ready in `streams`, windows of equal shape batched. -> per stream its new PCM
        chunks in order (float32, 24 kHz); [] for a stream with nothing ready."""
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("step: a stream appears twice")
        with self._lock, torch.inference_mode():
            plans = [(s, w) for s in streams for w in s._windows()]
            wavs = self._run([(s, w) for s, w in plans])
            out = {id(s): [] for s in streams}
            for (s, w), wav in zip(plans, wavs):
                out[id(s)].append(wav)
                s._done, s._emitted = w.end, w.emit_to
        return [out[id(s)] for s in streams]

    def _run(self, plans) -> list[np.ndarray]:
        """Each window's emitted samples [emit_to - emit_from] float32, in plan order."""
        result: list = [None] * len(plans)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, w) in enumerate(plans):
            groups.setdefault((w.end - w.start, w.conv_start - w.start), []).append(i)
        spf = self.samples_per_frame
        for (_length, skip), idx in groups.items():
            for k in range(0, len(idx), self.config.max_batch):
                rows = idx[k : k + self.config.max_batch]
                codes = torch.stack([plans[i][0]._codes_tensor(plans[i][1].start, plans[i][1].end) for i in rows]).to(
                    self.device
                )  # [B, 16, length]
                first = torch.tensor([plans[i][1].start for i in rows], device=self.device)  # [B]
                wav = self._decode(codes, skip, first)  # [B, (length - skip) * 1920 - 555]
                for r, i in enumerate(rows):
                    w = plans[i][1]
                    base = w.conv_start * spf
                    result[i] = wav[r, w.emit_from - base : w.emit_to - base].float().cpu().numpy()
        return result

    def _decode(self, codes: torch.Tensor, skip: int, first: torch.Tensor) -> torch.Tensor:
        """`Qwen3OmniMoeCode2Wav.forward`, split: the transformer over all frames of codes [B, 16, T], at their
        positions in the utterance (first [B]: the window's first frame; RoPE then computes the offline pass's very
        angles), the convolutions over frames [skip, T) only. -> wav [B, (T - skip) * 1920 - 555], in [-1, 1]."""
        m = self.model
        self.stats.calls += 1
        self.stats.windows += codes.shape[0]
        self.stats.transformer_frames += codes.shape[0] * codes.shape[2]
        self.stats.conv_frames += codes.shape[0] * (codes.shape[2] - skip)
        hidden = m.code_embedding(codes + m.code_offset).mean(1)  # [B, T, H]
        positions = first[:, None] + torch.arange(codes.shape[2], device=codes.device)  # [B, T]
        hidden = m.pre_transformer(inputs_embeds=hidden, position_ids=positions).last_hidden_state[:, skip:]
        hidden = hidden.permute(0, 2, 1)
        for blocks in m.upsample:
            for block in blocks:
                hidden = block(hidden)
        wav = hidden
        for block in m.decoder:
            wav = block(wav)
        return wav.clamp(min=-1, max=1)[:, 0]


@dataclass(frozen=True)
class _Window:
    start: int  # first frame through the transformer (context included)
    conv_start: int  # first frame through the convolutions
    end: int  # one past the last frame (the chunk is [previous end, end))
    emit_from: int  # global sample indices emitted by this window: [emit_from, emit_to)
    emit_to: int


class Code2WavStream:
    """One request's streaming state: frames so far, frames chunked, samples emitted. Driven by Code2Wav.step."""

    def __init__(self, owner: Code2Wav):
        self._owner = owner
        self._frames: list[list[int]] = []
        self._codes: Optional[torch.Tensor] = None  # [16, n] cache of _frames
        self._last = False
        self._done = 0  # frames chunked so far
        self._emitted = 0  # samples emitted so far

    def push(self, frames, last: bool = False) -> None:
        """Append frames (each num_quantizers ids); last=True when the talker has finished."""
        if self._last:
            raise RuntimeError("push after the last frames of the stream")
        self._frames += self._owner.check_codes(frames)
        self._codes = None
        self._last = bool(last)

    @property
    def ready(self) -> bool:
        return bool(self._windows(limit=1))

    @property
    def receiving(self) -> bool:
        """Frames have come (its first chunk is on its way, or done)."""
        return bool(self._frames)

    @property
    def finished(self) -> bool:
        return self._last and self._done >= len(self._frames)

    def _codes_tensor(self, start: int, end: int) -> torch.Tensor:
        if self._codes is None or self._codes.shape[1] < end:
            self._codes = torch.tensor(self._frames, dtype=torch.long).T.reshape(self._owner.groups, -1)
        return self._codes[:, start:end]

    def _windows(self, limit: Optional[int] = None) -> list[_Window]:
        o, c = self._owner, self._owner.config
        n_avail, spf = len(self._frames), o.samples_per_frame
        out, s, emitted = [], self._done, self._emitted
        while limit is None or len(out) < limit:
            e = s + (c.first_chunk_frames if s == 0 else c.chunk_frames)
            if e > n_avail:
                if not (self._last and s < n_avail):
                    break
                e = n_avail  # the true end
            emit_to = e * spf - o.holdback  # every later sample waits for frame e
            conv_start = max(0, emitted // spf - o.conv_context)
            out.append(_Window(max(0, conv_start - o.transformer_context), conv_start, e, emitted, emit_to))
            s, emitted = e, emit_to
        return out
