"""The Thinker stage: Qwen2.5-Omni's language model fed with `inputs_embeds` (media embeddings merged at their
placeholders) and TMRoPE positions from `get_rope_index`, decoded by the shared Engine.

Per generated token g_k it emits a TextDelta (incremental, UTF-8 safe) and, for speech, the hand-off the Talker
needs: R_k = h(g_k) + e(g_k) once g_k has been fed (so the Talker runs one Thinker step behind); after the prefill, a
TalkerPrompt with P = h(p) + e(p) (e zeroed at media placeholders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Literal, Optional

import torch

from omni.engine import DecoderModel, Engine, EngineConfig, EngineLoop, Sampler, Sequence
from omni.types import (
    InvalidRequest,
    MediaEmbeddings,
    PromptLayout,
    SamplingParams,
    TalkerPrompt,
    TextDelta,
    ThinkerDone,
    ThinkerItem,
    ThinkerToTalker,
)

__all__ = ["Thinker", "ThinkerSequence", "ForcedReplySequence", "Detokenizer", "check_context"]


class Detokenizer:
    """Incremental detokenization: a delta is released only when it does not end inside a multi-byte character
    (byte-level BPE decodes an incomplete UTF-8 sequence to U+FFFD); `flush` releases the rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already released (kept as context for the next delta)
        self._read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class ThinkerSequence(Sequence):
    hands_off_last = True  # _accept emits the last token's hand-off (Qwen3's sequence emits every hand-off itself)

    def __init__(
        self,
        thinker: Thinker,
        request_id: str,
        prompt: PromptLayout,
        media: MediaEmbeddings,
        sampling: SamplingParams,
        for_talker: bool,
    ):
        super().__init__(
            request_id,
            sampling.max_tokens,
            set(thinker.eos_ids) | set(sampling.stop_token_ids),
            history=prompt.input_ids[None].to(thinker.device),
        )  # [1, L + n]
        self.thinker, self.prompt, self.media, self.for_talker = thinker, prompt, media, for_talker
        self.sampler = Sampler(sampling, device=thinker.device)
        self.detok = Detokenizer(thinker.tokenizer)
        self.tokens: list[int] = []
        self._held: list[int] = []  # tokens whose text has not been released yet
        self.finish_reason: Literal["stop", "length", "cancelled"] = "length"

    # -------------------------------------------------------------------------------------------- engine hooks
    def prefill_inputs(self):
        t = self.thinker
        ids = self.prompt.input_ids[None].to(t.device)  # [1, L]
        embeds = t.embed(ids)  # [1, L, H]
        media_mask = torch.zeros_like(ids, dtype=torch.bool)
        for token_id, feats in (
            (t.cfg.audio_token_id, self.media.audios),
            (t.cfg.image_token_id, self.media.images),
            (t.cfg.video_token_id, self.media.videos),
        ):
            m = ids == token_id
            n = int(m.sum())
            if n == 0 and not feats:
                continue
            got = sum(f.shape[0] for f in feats)
            if got != n:
                raise InvalidRequest(
                    f"prompt has {n} placeholder tokens of id {token_id} but the encoders returned {got} embeddings"
                )
            embeds = embeds.masked_scatter(m[..., None], torch.cat(feats).to(t.device, embeds.dtype))
            media_mask |= m
        p = self.prompt
        pos3d, delta = t.rope_index(
            ids,
            p.image_grid_thw,
            p.video_grid_thw,
            torch.ones_like(ids),
            use_audio_in_video=p.use_audio_in_video,
            audio_seqlens=p.audio_seqlens,
            second_per_grids=p.video_second_per_grid,
        )  # [3, 1, L], [1, 1]
        self._embeds, self._media_mask = embeds, media_mask
        self.rope_delta = int(delta.reshape(-1)[0])
        return embeds[0], pos3d[:, 0].to(t.device)

    def on_prefill(self, hidden, token):
        if self.for_talker:  # P = h + e, e zeroed at the media placeholders
            prompt_embeds = hidden[0] + self._embeds[0].masked_fill(self._media_mask[0, :, None], 0.0)
            p = self.prompt
            self.outbox.append(
                TalkerPrompt(
                    input_ids=p.input_ids,
                    prompt_embeds=prompt_embeds,
                    first_token=token,
                    image_grid_thw=p.image_grid_thw,
                    video_grid_thw=p.video_grid_thw,
                    audio_seqlens=p.audio_seqlens,
                    video_second_per_grid=p.video_second_per_grid,
                    use_audio_in_video=p.use_audio_in_video,
                )
            )
        del self._embeds, self._media_mask
        self._accept(token)

    def next_input(self):
        if self.finished or not self.tokens:
            return None
        last = self.last_token  # long [1] on the device: g_k as sampled (no host round trip)
        if last is None:
            last = torch.tensor([self.tokens[-1]], device=self.thinker.device)
        L = self.prompt.input_ids.shape[0]
        self._fed = self.thinker.embed(last)[0]  # e(g_k) [H]
        return self._fed, L + len(self.tokens) - 1 + self.rope_delta

    def has_input(self):
        return not self.finished and bool(self.tokens)

    def on_step(self, hidden, token):
        k = len(self.tokens) - 1
        if self.for_talker:
            self.outbox.append(ThinkerToTalker(k, self.tokens[k], hidden[0] + self._fed, last=False))
        self._accept(token)

    # -------------------------------------------------------------------------------------------- internals
    def _accept(self, token: int) -> None:
        stop, last = self.append_token(token, self.tokens)
        text = self.detok.push(token)
        if last:
            text += self.detok.flush()
        self._held.append(token)
        if text:
            self.outbox.append(TextDelta(text, self._held))
            self._held = []
        if last:
            if self.for_talker and self.hands_off_last:
                self.outbox.append(ThinkerToTalker(len(self.tokens) - 1, token, None, last=True))
            self.finish_reason = "stop" if stop else "length"
            self.finished = True
            self.outbox.append(ThinkerDone(self.finish_reason, self.tokens))


class ForcedReplySequence(ThinkerSequence):
    """A reply known in advance (text to speak): one prefill over [prompt, g_0 .. g_{N-2}] gives every hand-off the
    Talker needs at once (R_k = h(g_k) + e(g_k) is the hidden state where g_k is the input, plus its embedding), so
    the Talker never waits for a Thinker step. g_{N-1} is the end of turn, never fed, as in generation. The sequence
    finishes at its prefill and never takes a decode row."""

    samples_prefill = False

    def __init__(
        self,
        thinker: Thinker,
        request_id: str,
        prompt: PromptLayout,
        media: MediaEmbeddings,
        sampling: SamplingParams,
        for_talker: bool,
        reply_ids: list[int],
    ):
        super().__init__(thinker, request_id, prompt, media, sampling, for_talker)
        self.reply_ids = reply_ids  # g_0 .. g_{N-1}, N >= 2, the last one the end-of-turn id

    def prefill_inputs(self):
        prompt = self.prompt
        L = prompt.input_ids.shape[0]
        fed = torch.tensor(self.reply_ids[:-1], dtype=prompt.input_ids.dtype)
        self.prompt = dataclasses.replace(prompt, input_ids=torch.cat([prompt.input_ids, fed]))  # [L + N - 1]
        try:
            return super().prefill_inputs()  # media placed and TMRoPE positions over prompt and reply alike
        finally:
            self.prompt, self._prompt_len = prompt, L

    def on_prefill(self, hidden, token):
        L, N, p = self._prompt_len, len(self.reply_ids), self.prompt
        e = self._embeds[0]  # [L + N - 1, H]
        if self.for_talker:
            prompt_embeds = hidden[0, :L] + e[:L].masked_fill(self._media_mask[0, :L, None], 0.0)  # P = h + e
            self.outbox.append(
                TalkerPrompt(
                    input_ids=p.input_ids,
                    prompt_embeds=prompt_embeds,
                    first_token=self.reply_ids[0],
                    image_grid_thw=p.image_grid_thw,
                    video_grid_thw=p.video_grid_thw,
                    audio_seqlens=p.audio_seqlens,
                    video_second_per_grid=p.video_second_per_grid,
                    use_audio_in_video=p.use_audio_in_video,
                )
            )
            for k in range(N - 1):
                self.outbox.append(ThinkerToTalker(k, self.reply_ids[k], hidden[0, L + k] + e[L + k], last=False))
            self.outbox.append(ThinkerToTalker(N - 1, self.reply_ids[-1], None, last=True))
        del self._embeds, self._media_mask
        self.tokens = list(self.reply_ids)
        text = "".join(self.detok.push(t) for t in self.reply_ids) + self.detok.flush()
        self.outbox.append(TextDelta(text, list(self.reply_ids)))
        self.finish_reason, self.finished = "stop", True
        self.outbox.append(ThinkerDone("stop", list(self.reply_ids)))


def check_context(prompt_tokens: int, sampling: SamplingParams, max_model_len: int) -> None:
    """Prompt + max_tokens must fit the context; raises InvalidRequest (a 400 for HTTP clients)."""
    if prompt_tokens + sampling.max_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
            f"model's context of {max_model_len} tokens",
            "max_tokens",
            "context_length_exceeded",
        )


class Thinker:
    """The Thinker stage of one model: `generate(...)` streams TextDelta, TalkerPrompt, ThinkerToTalker and a final
    ThinkerDone. Many concurrent calls share one engine (one batched forward per step)."""

    sequence_cls = ThinkerSequence  # Qwen3's Thinker (omni/thinker_qwen3.py) brings its own
    forced_reply_cls = ForcedReplySequence  # the reply given in advance (the speech endpoint)

    def __init__(self, thinker_model, tokenizer, config: EngineConfig = EngineConfig(), max_model_len: int = 32768):
        self.model = thinker_model  # Qwen2_5OmniThinkerForConditionalGeneration
        self.cfg = thinker_model.config
        self.tokenizer = tokenizer
        self.device = next(thinker_model.parameters()).device
        self.embed = thinker_model.get_input_embeddings()
        self.rope_index = thinker_model.get_rope_index
        self.max_model_len = max_model_len
        eos = thinker_model.generation_config.eos_token_id
        if eos is None:
            eos = self.cfg.text_config.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        self.lm = thinker_model.model.language_model
        self.engine = Engine(
            DecoderModel(
                self.forward, self.last_logits, self.cfg.text_config, self.device, dtype=self.embed.weight.dtype
            ),
            config,
            "thinker",
        )
        self.loop = EngineLoop(self.engine)

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig = EngineConfig(), max_model_len: int = 32768) -> Thinker:
        """From a loaded whole model (Qwen2_5OmniForConditionalGeneration)."""
        return cls.from_thinker(model.thinker, tokenizer, config, max_model_len, model.config)

    @classmethod
    def from_thinker(cls, thinker_model, tokenizer, config: EngineConfig, max_model_len: int, model_config) -> Thinker:
        """From the thinker alone and the whole checkpoint's config (a replica of its own: omni.serve.models)."""
        return cls(thinker_model, tokenizer, config, max_model_len)

    def forward(self, x, pos, mask, cache, **extra):
        """The engine's forward: inputs_embeds [B, T, H] -> last hidden states [B, T, H]."""
        return self.lm(
            inputs_embeds=x, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True
        ).last_hidden_state

    def last_logits(self, hidden):
        """Like generate (logits_to_keep=1): the head on the last position only."""
        return self.model.lm_head(hidden[:, -1, :]).float()

    def reply_ids(self, text: str) -> list[int]:
        """A reply's ids as the Thinker would end it: the text's tokens, then the end-of-turn id."""
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        end = end if end in self.eos_ids else self.eos_ids[0]
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) + [end]

    def generate(
        self,
        request_id: str,
        prompt: PromptLayout,
        media: MediaEmbeddings,
        sampling: SamplingParams,
        for_talker: bool = False,
        forced_reply: Optional[str] = None,
    ) -> AsyncIterator[ThinkerItem]:
        """forced_reply: the reply's text, known in advance (speech of a given text): one prefill, no decoding.
        The request was checked where it entered (omni.serve.compose: sampling, context); what is left is this
        engine's own capacity (its KV cache), and a forced reply's length, known only once it is tokenized."""
        if forced_reply is None:
            self.engine.check_fits(int(prompt.input_ids.shape[0]) + sampling.max_tokens)
            return self.loop.submit(self.sequence_cls(self, request_id, prompt, media, sampling, for_talker))
        if self.forced_reply_cls is None:
            raise InvalidRequest("speech of a given text is not served for this model yet", "model")
        ids = self.reply_ids(forced_reply)
        if len(ids) < 2:
            raise InvalidRequest("the text to speak is empty", "input")
        check_context(
            int(prompt.input_ids.shape[0]), dataclasses.replace(sampling, max_tokens=len(ids)), self.max_model_len
        )
        return self.loop.submit(self.forced_reply_cls(self, request_id, prompt, media, sampling, for_talker, ids))
