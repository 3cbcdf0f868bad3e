"""The Talker stage: Qwen2.5-Omni's talker turns the Thinker's stream into codec tokens while the text is still
being written, one Thinker step behind, step-batched across requests on the shared Engine.

Input recipe (the model as trained; transformers 5.23's unpadded single-request `generate` skips the codec pad/bos
embeddings and the M-RoPE positions, see omni/reference.py `keep_talker_mask`). All vectors live in the Thinker's
hidden space and go through `talker.thinker_to_talker_proj`:
    prefill (L + 2 positions): [P_0 .. P_{L-1},  E(speaker_bos) + E_codec(pad),  R_0 + E_codec(bos)]   -> code_0
    step k >= 1:               E_codec(code_{k-1}) + R_k                                                  -> code_k
    R_k = h(g_k) + e(g_k) while the Thinker writes; for the Thinker's last token g_{N-1} (never fed) R_{N-1} =
    E(tts_text_end), then E(tts_text_pad) for ever after.
    positions: talker.get_rope_index over [prompt ids, speaker_bos, g_0] for the prefill, then kv_len + delta on all
    three axes. Repetition penalty over [codec_mask] * L + [pad, bos] + codes; codec bos suppressed; the stop codes
    (8292 pad, 8294 end) end the reply and are kept in the output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional

import torch

from omni.engine import DecoderModel, Engine, EngineConfig, EngineLoop, Sampler, Sequence
from omni.sequence import Inbox
from omni.types import SamplingParams, TalkerDone, TalkerItem, TalkerPrompt, TalkerToVocoder, ThinkerToTalker

__all__ = ["Talker", "TalkerConfig", "TalkerSequence"]


@dataclass(frozen=True)
class TalkerConfig(EngineConfig):
    batch_wait_s: float = 0.01  # the Talker's rows are fed by Thinker steps: wait this long so they share a forward
    emit_every: int = 4  # codec ids per talker_to_vocoder hand-off (latency vs. per-message overhead)
    first_audio_codes: int = 24  # codes the vocoder's first window needs (VocoderConfig.first_window_codes()): until a
    #                              stream has them, no step waits batch_wait_s (its first audio is pending)
    emit_every_frames: int = 1  # Qwen3: frames (80 ms, 16 codebook ids each) per talker_to_vocoder hand-off
    first_audio_frames: int = 2  # Qwen3: frames Code2Wav's first chunk needs (Code2WavConfig.first_chunk_frames):
    #                              until a stream has them, no step waits batch_wait_s

    def __post_init__(self):
        super().__post_init__()
        if self.emit_every < 1:
            raise ValueError(f"emit_every must be >= 1, got {self.emit_every}")
        if self.first_audio_codes < 0:
            raise ValueError(f"first_audio_codes must be >= 0, got {self.first_audio_codes}")
        if self.first_audio_frames < 0:
            raise ValueError(f"first_audio_frames must be >= 0, got {self.first_audio_frames}")
        if self.emit_every_frames < 1:
            raise ValueError(f"emit_every_frames must be >= 1, got {self.emit_every_frames}")


class TalkerSequence(Sequence):
    @property
    def urgent(self) -> bool:
        """The vocoder's first window still lacks codes of this stream: its first audio waits on each step."""
        return not self.finished and len(self.codes) < self.first_audio_codes

    def __init__(self, talker: Talker, request_id: str, voice: str, sampling: SamplingParams, chunk: int = 1):
        # the repetition-penalty history needs the prompt length: set in prefill_inputs
        super().__init__(
            request_id, sampling.max_tokens, {talker.codec_pad, talker.codec_end} | set(sampling.stop_token_ids)
        )
        self.talker = talker
        self.first_audio_codes = talker.first_audio_codes
        self.speaker_bos = int(talker.speakers[voice]["bos_token"])
        self.sampler = Sampler(sampling, suppress=(talker.codec_bos,), device=talker.device)
        self.inbox = Inbox()  # TalkerPrompt, then ThinkerToTalker in order
        self.prompt: Optional[TalkerPrompt] = None
        self.replies: list[torch.Tensor] = []  # R_k for fed thinker tokens, [H] each
        self.n_text: Optional[int] = None  # N, once the Thinker's last token is known
        self.codes: list[int] = []
        self.emit_every = max(1, chunk)  # hand codes to the vocoder in groups of this many
        self._unsent = 0

    # -------------------------------------------------------------------------------------------- feeding
    def feed(self, item) -> None:
        """From the consumer thread: the Thinker's TalkerPrompt or ThinkerToTalker items, in order."""
        self.inbox.put(item)

    def _drain(self) -> None:
        self.inbox.take(self._take)

    def _take(self, item) -> None:
        if isinstance(item, TalkerPrompt):
            self.prompt = item
        elif isinstance(item, ThinkerToTalker):
            if item.reply is not None:
                self.replies.append(item.reply)
            if item.last:
                self.n_text = item.index + 1

    def _reply(self, k: int) -> Optional[torch.Tensor]:
        """R_k, or None while the Thinker has not fed g_k yet."""
        if k < len(self.replies):
            return self.replies[k]
        if self.n_text is not None:
            return self.talker.text_eos_embed if k == self.n_text - 1 else self.talker.text_pad_embed
        return None

    # -------------------------------------------------------------------------------------------- engine hooks
    def ready_to_prefill(self) -> bool:
        self._drain()
        return self.prompt is not None and self._reply(0) is not None

    def prefill_inputs(self):
        t, p = self.talker, self.prompt
        dev = t.device
        ids = p.input_ids.to(dev)
        L = ids.shape[0]
        text_ids = torch.cat([ids, ids.new_tensor([self.speaker_bos, p.first_token])])[None]  # [1, L + 2]
        mask = torch.ones_like(text_ids)
        pos3d, delta = t.rope_index(
            text_ids,
            _to(p.image_grid_thw, dev),
            _to(p.video_grid_thw, dev),
            mask,
            p.use_audio_in_video,
            _to(p.audio_seqlens, dev),
            _to(p.video_second_per_grid, dev),
        )
        self.rope_delta = int(delta.reshape(-1)[0])
        spk = t.thinker_embed(torch.tensor([self.speaker_bos], device=dev))[0]
        x = torch.cat(
            [
                p.prompt_embeds.to(dev),
                (spk + t.codec_embed(torch.tensor([t.codec_pad], device=dev))[0])[None],
                (self._reply(0) + t.codec_embed(torch.tensor([t.codec_bos], device=dev))[0])[None],
            ]
        )
        self.kv_len = L + 2
        self.history = torch.tensor([[t.codec_mask] * L + [t.codec_pad, t.codec_bos]], device=dev)
        self.prompt = None  # the prompt embeddings are in the KV cache now
        return x, pos3d[:, 0]

    def on_prefill(self, hidden, token):
        self._accept(token)

    def next_input(self):
        if self.finished:
            return None
        self._drain()
        R = self._reply(len(self.codes))
        if R is None:
            return None
        last = self.last_token  # long [1] on the device: the last code as sampled (no host round trip)
        if last is None:
            last = torch.tensor([self.codes[-1]], device=self.talker.device)
        x = self.talker.codec_embed(last)[0] + R
        return x, self.kv_len + self.rope_delta

    def has_input(self):
        self._drain()
        return not self.finished and self._reply(len(self.codes)) is not None

    def on_step(self, hidden, token):
        self.kv_len += 1
        self._accept(token)

    def _accept(self, code: int) -> None:
        stop, last = self.append_token(code, self.codes)
        if not stop:
            self._unsent += 1
        if self._unsent and (last or self._unsent >= self.emit_every):
            n = self._unsent
            new = self.codes[-n - (1 if stop else 0) : len(self.codes) - (1 if stop else 0)]
            self.outbox.append(TalkerToVocoder(new, last=last))
            self._unsent = 0
        elif last:
            self.outbox.append(TalkerToVocoder([], last=True))
        if last:
            self.finished = True
            self.outbox.append(TalkerDone(list(self.codes), "stop" if stop else "length"))


def _to(x, dev):
    return None if x is None else x.to(dev)


class Talker:
    """The Talker stage of one model. `generate(request_id, voice, sampling)` returns (sequence, async iterator of
    TalkerToVocoder items and a final TalkerDone); feed the sequence with the Thinker's hand-offs and call `wake()`."""

    def __init__(self, talker, speakers: dict, thinker_embed: torch.nn.Module, config: TalkerConfig = TalkerConfig()):
        tk = self.model = talker  # Qwen2_5OmniTalkerForConditionalGeneration
        self.speakers = speakers  # spk_dict.pt: {voice: {bos_token, cond, ref_mel}}
        self.device = next(tk.parameters()).device
        self.thinker_embed = thinker_embed  # the Thinker's input embedding (speaker bos, tts_text_* ids)
        self.codec_embed = tk.get_input_embeddings()
        self.rope_index = tk.get_rope_index
        self.codec_bos, self.codec_pad = tk.codec_bos_token, tk.codec_pad_token
        self.codec_end, self.codec_mask = tk.codec_eos_token, tk.codec_mask_token
        self.emit_every = config.emit_every
        self.first_audio_codes = config.first_audio_codes
        with torch.inference_mode():
            ids = torch.tensor([tk.text_eos_token, tk.text_pad_token], device=self.device)
            self.text_eos_embed, self.text_pad_embed = self.thinker_embed(ids)  # [H] each, thinker vocabulary ids

        def forward(x, pos, mask, cache):
            return tk.model(
                inputs_embeds=tk.thinker_to_talker_proj(x),
                position_ids=pos,
                attention_mask=mask,
                cache=cache,
                use_cache=True,
            ).last_hidden_state

        def last_logits(hidden):  # the head over all positions, then the last one: as the talker's forward does
            return tk.codec_head(hidden).float()[:, -1]

        self.engine = Engine(
            DecoderModel(forward, last_logits, tk.config, self.device, dtype=next(tk.parameters()).dtype),
            config,
            "talker",
        )
        self.loop = EngineLoop(self.engine)

    @classmethod
    def from_model(cls, model, config: TalkerConfig = TalkerConfig()) -> Talker:
        """From a loaded Qwen2_5OmniForConditionalGeneration."""
        return cls(model.talker, model.speaker_map, model.thinker.get_input_embeddings(), config)

    @classmethod
    def from_part(cls, part, config: TalkerConfig = TalkerConfig()) -> Talker:
        """From the talker's weights alone (omni.parts.TalkerPart: the voices, the Thinker's embedding rows)."""
        return cls(part.talker, part.speakers, part.thinker_embed, config)

    @staticmethod
    def configure(config: TalkerConfig, vocoder_config) -> TalkerConfig:
        """`config` with the first-audio threshold of the vocoder's (omni.decoders.VocoderConfig) first window."""
        return dataclasses.replace(config, first_audio_codes=vocoder_config.first_window_codes())

    @property
    def voices(self) -> list[str]:
        return sorted(self.speakers)

    def generate(
        self, request_id: str, voice: str, sampling: SamplingParams
    ) -> tuple[TalkerSequence, AsyncIterator[TalkerItem]]:
        seq = TalkerSequence(self, request_id, voice, sampling, self.emit_every)
        return seq, self.loop.submit(seq)
