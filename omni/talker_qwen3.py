"""The Talker stage for Qwen3-Omni: its MoE talker predicts codebook 0 of each 80 ms frame on the shared decode
engine (continuous batching across requests, like Qwen2.5's omni/talker.py), and its code predictor, a small
transformer re-prefilled every frame, predicts the frame's 15 residual codebooks, for every row that produced a
codebook-0 id in the engine step, as one batched run (`Engine` `after_step`).

The recipe, as `Qwen3OmniMoeForConditionalGeneration.generate` builds it (transformers 5.23/5.24; P = text_projection,
Q = hidden_projection, E = the talker's codec embedding, E_j = the code predictor's embedding of codebook j):
    prefill (U + 9 positions): the user turns, P(e(p)) at text tokens and Q(h(p)) at media tokens, then the assistant
        part: P(A_0..A_2) + 0, P(tts_pad) + E(nothink), + E(think_bos), + E(think_eos), + E(speaker),
        P(tts_bos) + E(codec_pad), P(A_3) + E(codec_bos)                                            -> code0 of frame 0
        A = the Thinker's input embeddings from its last <|im_start|>assistant: "<|im_start|>", "assistant", "\\n",
        then e(g_0), e(g_1), ... ; the Thinker's last token g_{N-1} is never part of A.
    frame k: the code predictor over [talker hidden state that produced code0_k, E(code0_k)] then its own
        outputs, greedy or sampled (top-k 50, top-p 0.8) -> codes 1..15 of frame k
    step s >= 1: E(code0) + sum_j E_j(code_j) of frame s-1, + P(A_{3+s}) while A has it, P(tts_eos) at 3+s == len(A),
        P(tts_pad) ever after                                                                    -> code0 of frame s
    positions: talker.get_rope_index over [user ids, tts_pad x 9] (with the prompt's grids and audio lengths, as the
        official path passes them: use_audio_in_video is not passed to its talker), then kv length + delta.
    decoding: repetition penalty over the codebook-0 ids generated so far only; [vocab - 1024, vocab) suppressed but
        codec EOS (2150), which ends the reply and is no frame. At max_tokens the last codebook-0 id gets no frame
        (the official path computes a frame's residuals at the next step), so max_tokens ids give max_tokens - 1 frames.
Sampling: one torch.Generator per request, drawn in the official order (code0 of frame k, then its 15 residuals).
A reply of one Thinker token (A ends before A_3) makes the official generate raise; here the talker says nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Optional

import torch
from transformers import DynamicCache

from omni.engine import DecoderModel, Engine, EngineLoop, Sampler, Sequence
from omni.sampling import sample_rows
from omni.sequence import Inbox
from omni.talker import TalkerConfig
from omni.types import (
    InvalidRequest,
    Qwen3TalkerPrompt,
    SamplingParams,
    TalkerDone,
    TalkerItem,
    TalkerToVocoder,
    ThinkerToTalker,
)

__all__ = ["Qwen3Talker", "Qwen3TalkerSequence"]

_PROMPT_TAIL = 3  # <|im_start|> assistant \n: A_0..A_2 go in before the codec specials, A_3 with codec bos


class Qwen3TalkerSequence(Sequence):
    @property
    def urgent(self) -> bool:
        """Code2Wav's first chunk still lacks frames of this stream: its first audio waits on each step."""
        return not self.finished and len(self.frames) < self.first_audio_frames

    def __init__(self, talker: Qwen3Talker, request_id: str, voice: str, sampling: SamplingParams, emit_every: int):
        super().__init__(
            request_id,
            sampling.max_tokens,
            {talker.codec_eos} | set(sampling.stop_token_ids),
            history=torch.zeros(1, 0, dtype=torch.long, device=talker.device),
        )  # generated code0 only
        self.talker = talker
        self.speaker = talker.speaker_ids[voice.lower()]
        self.sampler = Sampler(sampling, suppress=talker.suppress, device=talker.device)
        # the code predictor samples when the talker does, from the same generator (the official global-RNG order)
        self.predictor_sampler = Sampler(
            talker.predictor_sampling if not sampling.greedy else SamplingParams(), device=talker.device
        )
        self.predictor_sampler.generator = self.sampler.generator
        self.inbox = Inbox()  # Qwen3TalkerPrompt, then ThinkerToTalker in order
        self.prompt: Optional[Qwen3TalkerPrompt] = None
        self.tail: Optional[torch.Tensor] = None  # [t, H_thinker] A_0 .. A_{t-1}
        self.replies: list[torch.Tensor] = []  # e(g_k) [H_thinker] for the Thinker's tokens but its last
        self.n_text: Optional[int] = None  # N, once the Thinker's last token is known
        self.code0: list[int] = []  # codebook-0 ids sampled so far (the stop id included)
        self.frames: list[list[int]] = []  # complete frames, [num_code_groups] ids each
        self.emit_every = max(1, emit_every)
        self.first_audio_frames = talker.first_audio_frames
        self._unsent = 0
        self.pending: Optional[int] = None  # a code0 waiting for its residual codebooks (the code predictor)
        self.hidden: Optional[torch.Tensor] = None  # [H_talker] the talker output that produced `pending`
        self.frame_embed: Optional[torch.Tensor] = None  # [H_talker] sum of the last frame's 16 embeddings

    # -------------------------------------------------------------------------------------------- feeding
    def feed(self, item) -> None:
        """From the consumer thread: the Thinker's Qwen3TalkerPrompt or ThinkerToTalker items, in order."""
        self.inbox.put(item)

    def _drain(self) -> None:
        self.inbox.take(self._take)

    def _take(self, item) -> None:
        if isinstance(item, Qwen3TalkerPrompt):
            self.prompt, self.tail = item, item.assistant_embeds
        elif isinstance(item, ThinkerToTalker):
            if item.reply is not None:
                self.replies.append(item.reply)
            if item.last:
                self.n_text = item.index + 1

    def _slot(self, i: int) -> Optional[torch.Tensor]:
        """The text input of assistant position i (thinker space, [H]): A_i, then tts_eos at len(A), then tts_pad;
        None while the Thinker has not produced it yet."""
        t = self.tail.shape[0]
        if i < t:
            return self.tail[i]
        if i - t < len(self.replies):
            return self.replies[i - t]
        if self.n_text is None:
            return None
        n_a = t + self.n_text - 1  # len(A): the Thinker's last token is not in it
        return self.talker.tts_eos if i == n_a else self.talker.tts_pad

    # -------------------------------------------------------------------------------------------- engine hooks
    def ready_to_prefill(self) -> bool:
        self._drain()
        if self.prompt is None or self.finished:
            return self.finished
        if self.n_text is not None and self.tail.shape[0] + self.n_text - 1 <= _PROMPT_TAIL:
            self._finish("stop")  # a one-token reply: nothing to say (the official generate raises here)
            return True
        return self._slot(_PROMPT_TAIL) is not None

    def prefill_inputs(self):
        tk, p = self.talker, self.prompt
        if self.tail.shape[0] < _PROMPT_TAIL:
            raise InvalidRequest("the prompt does not end with <|im_start|>assistant and a newline")
        dev, dtype = tk.device, tk.dtype
        m = tk.model
        ue, media = p.user_embeds.to(dev, dtype), p.user_media.to(dev)
        U = ue.shape[0]
        user = torch.empty(U, tk.hidden_size, device=dev, dtype=dtype)  # [U, H_talker]
        if bool(media.any()):
            user[media] = m.hidden_projection(ue[media])
        if bool((~media).any()):
            user[~media] = m.text_projection(ue[~media])
        a = m.text_projection(
            torch.cat([self.tail[:_PROMPT_TAIL].to(dev, dtype), self._slot(_PROMPT_TAIL)[None].to(dev, dtype)])
        )  # [4, H_talker]
        text = torch.cat([a[:3], tk.tts_pad_p.expand(4, -1), tk.tts_bos_p[None], a[3:4]])  # [9, H_talker]
        c = tk.codec_specials
        codec = m.get_input_embeddings()(
            torch.tensor([c["nothink"], c["think_bos"], c["think_eos"], self.speaker, c["pad"], c["bos"]], device=dev)
        )
        codec = torch.cat([torch.zeros(3, tk.hidden_size, device=dev, dtype=dtype), codec])  # [9, H_talker]
        x = torch.cat([user, text + codec])  # [U + 9, H_talker]
        ids = torch.cat([p.user_ids.to(dev), torch.full((9,), tk.tts_pad_id, device=dev)])[None]  # [1, U + 9]
        has_mm = p.audio_seqlens is not None or p.image_grid_thw is not None or p.video_grid_thw is not None
        if has_mm:
            pos3d, delta = tk.rope_index(
                ids,
                _to(p.image_grid_thw, dev),
                _to(p.video_grid_thw, dev),
                torch.ones_like(ids),
                False,
                _to(p.audio_seqlens, dev),
                _to(p.video_second_per_grid, dev),
            )  # [3, 1, U + 9] float, [1, 1]
            self.rope_delta = float(delta.reshape(-1)[0])
        else:
            pos3d, self.rope_delta = torch.arange(ids.shape[1], device=dev).view(1, 1, -1).expand(3, 1, -1), 0
        self.kv_len = ids.shape[1]
        self.prompt = None  # the prompt is in the KV cache now
        return x, pos3d[:, 0]

    def on_prefill(self, hidden, token):
        self._accept(token, hidden[0, -1])

    def next_input(self):
        if self.finished or self.pending is not None or self.frame_embed is None:
            return None
        self._drain()
        text = self._slot(_PROMPT_TAIL + len(self.code0))
        if text is None:
            return None
        tk = self.talker
        x = self.frame_embed + tk.model.text_projection(text.to(tk.device, tk.dtype)[None])[0]
        return x, self.kv_len + self.rope_delta  # float for a multimodal prompt (M-RoPE deltas are float32)

    def has_input(self):
        self._drain()
        return (
            not self.finished
            and self.pending is None
            and self.frame_embed is not None
            and self._slot(_PROMPT_TAIL + len(self.code0)) is not None
        )

    def on_step(self, hidden, token):
        self.kv_len += 1
        self._accept(token, hidden[0])

    # -------------------------------------------------------------------------------------------- frames
    def _accept(self, code0: int, hidden: torch.Tensor) -> None:
        stop, last = self.append_token(code0, self.code0)
        if stop:
            self._finish("stop")
        elif last:
            self._finish("length")  # this code0 would get its residuals at the next step: the official drops it
        else:
            self.pending, self.hidden = code0, hidden

    def add_frame(self, frame: list[int], embed: torch.Tensor) -> None:
        """The code predictor completed the pending frame; embed [H_talker] is its 16 embeddings summed."""
        self.frames.append(frame)
        self.pending, self.hidden, self.frame_embed = None, None, embed
        self._unsent += 1
        if self._unsent >= self.emit_every:
            self._emit(last=False)

    def _emit(self, last: bool) -> None:
        new = self.frames[len(self.frames) - self._unsent :] if self._unsent else []
        if new or last:
            self.outbox.append(TalkerToVocoder(new, last=last))
        self._unsent = 0

    def _finish(self, reason: str) -> None:
        self._emit(last=True)
        self.finished = True
        self.outbox.append(TalkerDone(list(self.frames), reason))


def _to(x, dev):
    return None if x is None else x.to(dev)


class Qwen3Talker:
    """The Talker stage of a Qwen3-Omni model: `generate(request_id, voice, sampling)` returns (sequence, async
    iterator of TalkerToVocoder items, frames of 16 codebook ids, and a final TalkerDone); feed the sequence with the
    Thinker's hand-offs and call `loop.wake()`. The same interface as omni.talker.Talker."""

    def __init__(self, talker, tts_embeds: torch.Tensor, tts_pad_id: int, config: TalkerConfig = TalkerConfig()):
        # talker: Qwen3OmniMoeTalkerForConditionalGeneration; tts_embeds: [3, H_thinker] the Thinker's input
        # embeddings of tts_bos, tts_eos, tts_pad (ids outside its tokenizer)
        self.model = tk = talker
        cfg = tk.config
        self.device = next(tk.parameters()).device
        self.dtype = next(tk.parameters()).dtype
        self.hidden_size = cfg.text_config.hidden_size
        self.groups = cfg.num_code_groups  # 16 codebooks per frame
        self.speaker_ids = {k.lower(): int(v) for k, v in cfg.speaker_id.items()}
        self.codec_eos = int(cfg.codec_eos_token_id)
        self.codec_specials = {
            "nothink": cfg.codec_nothink_id,
            "think_bos": cfg.codec_think_bos_id,
            "think_eos": cfg.codec_think_eos_id,
            "pad": cfg.codec_pad_id,
            "bos": cfg.codec_bos_id,
        }
        vocab = cfg.text_config.vocab_size
        self.suppress = tuple(i for i in range(vocab - 1024, vocab) if i != self.codec_eos)  # as generate suppresses
        cp = tk.code_predictor
        self.predictor_sampling = SamplingParams(
            temperature=float(cp.generation_config.temperature or 1.0), top_k=50, top_p=0.8
        )  # what the talker's generate passes it
        self.tts_pad_id = tts_pad_id
        self.rope_index = tk.get_rope_index
        self.emit_every = config.emit_every_frames
        self.first_audio_frames = config.first_audio_frames
        with torch.inference_mode():
            e = tts_embeds.to(self.device, self.dtype)
            self.tts_bos, self.tts_eos, self.tts_pad = e  # thinker space [H_thinker] each
            self.tts_bos_p, self.tts_eos_p, self.tts_pad_p = tk.text_projection(e)  # talker space [H_talker] each

        def forward(x, pos, mask, cache):
            return tk.model(
                inputs_embeds=x, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True
            ).last_hidden_state

        def last_logits(hidden):  # the head over all positions, then the last one: as the talker's forward does
            return tk.codec_head(hidden).float()[:, -1]

        self.engine = Engine(
            DecoderModel(
                forward, last_logits, tk.config.text_config, self.device, after_step=self._predict, dtype=self.dtype
            ),
            config,
            "talker",
        )
        self.predictor_runs = 0  # batched code-predictor runs (15 forwards each)
        self.predictor_max_batch = 0  # most frames in one run
        self.loop = EngineLoop(self.engine)

    @classmethod
    def from_model(cls, model, config: TalkerConfig = TalkerConfig()) -> Qwen3Talker:
        """From a loaded Qwen3OmniMoeForConditionalGeneration (with its talker)."""
        c = model.config
        ids = torch.tensor(
            [c.tts_bos_token_id, c.tts_eos_token_id, c.tts_pad_token_id], device=next(model.thinker.parameters()).device
        )
        with torch.inference_mode():
            tts = model.thinker.get_input_embeddings()(ids)
        return cls(model.talker, tts, int(c.tts_pad_token_id), config)

    @classmethod
    def from_part(cls, part, config: TalkerConfig = TalkerConfig()) -> Qwen3Talker:
        """From the talker's weights alone (omni.parts.TalkerPart: the Thinker's tts_bos/eos/pad rows)."""
        return cls(part.talker, part.tts_embeds, part.tts_pad_id, config)

    @staticmethod
    def configure(config: TalkerConfig, vocoder_config) -> TalkerConfig:
        """`config` with the first-audio threshold of Code2Wav's (omni.decoders.Code2WavConfig) first chunk."""
        return dataclasses.replace(config, first_audio_frames=vocoder_config.first_chunk_frames)

    @property
    def voices(self) -> list[str]:
        return sorted(name.capitalize() for name in self.speaker_ids)

    def generate(
        self, request_id: str, voice: str, sampling: SamplingParams
    ) -> tuple[Qwen3TalkerSequence, AsyncIterator[TalkerItem]]:
        seq = Qwen3TalkerSequence(self, request_id, voice, sampling, self.emit_every)
        return seq, self.loop.submit(seq)

    # -------------------------------------------------------------------------------------------- code predictor
    @torch.inference_mode()
    def _predict(self, touched: list) -> None:
        """One batched code-predictor run for every row whose codebook-0 id was sampled in this engine step."""
        rows = [
            s
            for s in touched
            if isinstance(s, Qwen3TalkerSequence) and s.pending is not None and not (s.finished or s.cancelled)
        ]
        if not rows:
            return
        self.predictor_runs += 1
        self.predictor_max_batch = max(self.predictor_max_batch, len(rows))
        cp = self.model.code_predictor
        embed0 = self.model.get_input_embeddings()
        code0 = torch.cat([s.last_token for s in rows])  # [B] on the device: the code0 each row sampled
        e0 = embed0(code0)  # [B, H]
        x = torch.stack([torch.stack([s.hidden.to(self.dtype), e]) for s, e in zip(rows, e0)])  # [B, 2, H]
        cache = DynamicCache(config=cp.config)
        codes = [code0]
        embeds = [e0]
        for j in range(1, self.groups):
            hidden = cp.model(inputs_embeds=x, cache=cache, use_cache=True).last_hidden_state  # [B, T, H]
            logits = cp.lm_head[j - 1](hidden[:, -1]).float()  # [B, codebook]
            cj = sample_rows(
                [s.predictor_sampler for s in rows], [None] * len(rows), [logits[i : i + 1] for i in range(len(rows))]
            )  # [B] on the device
            codes.append(cj)
            embeds.append(cp.model.get_input_embeddings()[j - 1](cj))  # [B, H]
            x = embeds[-1][:, None]
        frame_sum = torch.stack(embeds, dim=1).sum(1)  # [B, H]: the 16 embeddings summed, as generate sums them
        frames = torch.stack(codes, dim=1).tolist()  # [B, 16]: the run's one host transfer
        for i, s in enumerate(rows):
            s.add_frame(frames[i], frame_sum[i])
