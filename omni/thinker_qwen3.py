"""The Thinker stage for Qwen3-Omni: its MoE language model on the same decode engine as Qwen2.5's (omni/thinker.py,
continuous batching across requests), fed with `inputs_embeds`, M-RoPE positions from the thinker's own
`get_rope_index`, and, in the prefill, the vision tower's deepstack features.

Differences from Qwen2.5, each checked against `Qwen3OmniMoeThinkerModel.forward` and the official `generate`:
- deepstack: level i of the image/video deepstack features is added to the output of decoder layer i at the vision
  placeholder tokens (`deepstack_visual_embeds`, `visual_pos_masks`); images and videos share one joint tensor in
  prompt order. Only the prefill has vision tokens.
- the hand-off to the Talker (omni/talker_qwen3.py). Once, after the prefill, a `Qwen3TalkerPrompt`: the user turns'
  ids and, per position, the input embedding (text tokens) or the output of decoder layer `accept_hidden_layer - 1`
  (media tokens; HF's hidden_states[accept_hidden_layer], taken before that layer's deepstack addition), plus the
  embeddings of the prompt's tail from the last `<|im_start|>assistant`. The system turn (and any earlier assistant
  turn) is not voiced. Then per generated token g_k, as soon as it is sampled (no Thinker step behind, unlike
  Qwen2.5): ThinkerToTalker(k, g_k, e(g_k)), e = the input embedding; reply None for the last token, which the
  Talker never reads (it reads tts_eos in its place).
"""

from __future__ import annotations

import torch

from omni.engine import EngineConfig
from omni.thinker import Thinker, ThinkerSequence
from omni.types import InvalidRequest, Qwen3TalkerPrompt, ThinkerToTalker

__all__ = ["Qwen3Thinker", "Qwen3ThinkerSequence", "Qwen3ForcedReplySequence"]


class Qwen3ThinkerSequence(ThinkerSequence):
    hands_off_last = False  # every hand-off, the last one included, is emitted by _accept below

    def prefill_inputs(self):
        t = self.thinker
        ids = self.prompt.input_ids[None].to(t.device)  # [1, L]
        embeds = t.embed(ids)  # [1, L, H]
        cfg, media = t.cfg, self.media
        masks = {}
        for name, token_id, feats in (
            ("audio", cfg.audio_token_id, media.audios),
            ("image", cfg.image_token_id, media.images),
            ("video", cfg.video_token_id, media.videos),
        ):
            m = ids == token_id
            got, n = sum(f.shape[0] for f in feats), int(m.sum())
            if got != n:
                raise InvalidRequest(
                    f"prompt has {n} {name} placeholder tokens but the encoders returned {got} embeddings"
                )
            if n:
                embeds = embeds.masked_scatter(m[..., None], torch.cat(feats).to(t.device, embeds.dtype))
            masks[name] = m[0]
        extra = {}
        visual = masks["image"] | masks["video"]  # [L]
        if bool(visual.any()):
            extra = {"visual_pos_masks": visual[None], "deepstack_visual_embeds": self._deepstack(masks, visual)}
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
        self.rope_delta = float(delta.reshape(-1)[0])  # float32: video time positions are fractional
        self._embeds, self._media_mask = embeds, masks["audio"] | visual
        if self.for_talker:
            self._captured, self._capture_parts = {}, []
            extra["capture"] = self._captured  # the forward fills "hidden": [1, L, H] of the accept layer
            #                                    (per chunk in _capture_parts when the prefill is chunked)
        return embeds[0], pos3d[:, 0].to(t.device), extra  # positions: float32, as the official

    def prefill_chunk_kwargs(self, kwargs: dict, start: int, end: int) -> dict:
        """A chunk's deepstack rows (the vision tokens in [start, end)) and its own capture of the accept layer
        (joined in on_prefill)."""
        out = {}
        if "visual_pos_masks" in kwargs:
            m = kwargs["visual_pos_masks"]  # [1, L]
            before, inside = int(m[0, :start].sum()), int(m[0, start:end].sum())
            if inside:
                out["visual_pos_masks"] = m[:, start:end]
                out["deepstack_visual_embeds"] = [
                    lvl[before : before + inside] for lvl in kwargs["deepstack_visual_embeds"]
                ]
        if "capture" in kwargs:
            out["capture"] = {}
            self._capture_parts.append(out["capture"])
        return out

    def _deepstack(self, masks, visual) -> list[torch.Tensor]:
        """Per level [n_visual, H]: image rows at image tokens, video rows at video tokens, in prompt order."""
        t, media = self.thinker, self.media
        levels = t.deepstack_levels
        if len(media.image_deepstack) != len(media.images) or len(media.video_deepstack) != len(media.videos):
            raise InvalidRequest(
                "the vision encoder returned no deepstack features (a Qwen2.5 encoder for a Qwen3 Thinker?)"
            )
        joint = torch.zeros(levels, int(visual.sum()), t.hidden_size, device=t.device)
        sel = visual.nonzero().flatten()
        for name, feats in (("image", media.image_deepstack), ("video", media.video_deepstack)):
            if feats:
                rows = masks[name][sel]  # [n_visual] bool: which joint rows are this kind's
                joint[:, rows] = torch.cat(feats, dim=1).to(t.device, joint.dtype)
        return list(joint.to(self._dtype()))

    def _dtype(self):
        return self.thinker.embed.weight.dtype

    def on_prefill(self, hidden, token):
        if self.for_talker:
            self.outbox.append(self._talker_prompt())
        del self._embeds, self._media_mask
        self._captured = None
        self._accept(token)

    def _talker_prompt(self) -> Qwen3TalkerPrompt:
        """The talker's prompt, as `Qwen3OmniMoeForConditionalGeneration.generate` builds it from the prompt part."""
        t, p = self.thinker, self.prompt
        if self._capture_parts:  # a chunked prefill: the accept layer's output chunk by chunk
            self._captured["hidden"] = torch.cat([part["hidden"] for part in self._capture_parts], dim=1)
            self._capture_parts = []
        ids = p.input_ids.to(t.device)  # [L]
        L = ids.shape[0]
        pos = torch.arange(L, device=t.device)
        starts = torch.where(ids == t.im_start_id, pos, torch.full_like(pos, -1))
        role = ids[(torch.cummax(starts, 0).values.clamp_min(0) + 1).clamp_max(L - 1)]  # [L] each position's role id
        user = role == t.user_id
        heads = ((ids[:-1] == t.im_start_id) & (ids[1:] == t.assistant_id)).nonzero().flatten()
        if heads.numel() == 0:
            raise InvalidRequest("the prompt has no assistant turn to voice")
        a0 = int(heads[-1])
        e = self._embeds[0]  # [L, H] input embeddings, media features placed
        h = self._captured["hidden"][0]  # [L, H] the accept layer's output
        mixed = torch.where(self._media_mask[:, None], h, e)
        return Qwen3TalkerPrompt(
            user_ids=p.input_ids[user.cpu()],
            user_embeds=mixed[user],
            user_media=self._media_mask[user],
            assistant_embeds=e[a0:],
            image_grid_thw=p.image_grid_thw,
            video_grid_thw=p.video_grid_thw,
            audio_seqlens=p.audio_seqlens,
            video_second_per_grid=p.video_second_per_grid,
        )

    def on_step(self, hidden, token):
        self._accept(token)

    def _accept(self, token: int) -> None:
        index = len(self.tokens)
        if self.for_talker and not self.finished:
            # decide `last` as append_token will, before the ThinkerDone it may append
            last = token in self.stop_ids or index + 1 >= self.max_tokens
            ids = self.last_token if self.last_token is not None else torch.tensor([token], device=self.thinker.device)
            e = None if last else self.thinker.embed(ids)[0]
            self.outbox.append(ThinkerToTalker(index, token, e, last=last))
        super()._accept(token)


class Qwen3ForcedReplySequence(Qwen3ThinkerSequence):
    """A reply known in advance (the speech endpoint) for Qwen3: the Talker reads the reply only as input embeddings
    e(g_k) (no Thinker hidden state of the reply), so one prefill over the prompt gives the talker prompt, and every
    hand-off follows at once; the sequence finishes at its prefill and never takes a decode row. The official path,
    teacher-forced over the same ids, gives the Talker the same inputs (omni.reference_qwen3)."""

    def __init__(self, thinker, request_id, prompt, media, sampling, for_talker, reply_ids: list[int]):
        super().__init__(thinker, request_id, prompt, media, sampling, for_talker)
        self.reply_ids = reply_ids  # g_0 .. g_{N-1}, N >= 2, the last one the end-of-turn id
        self.max_tokens = len(reply_ids)

    samples_prefill = False

    def on_prefill(self, hidden, token):
        if self.for_talker:
            self.outbox.append(self._talker_prompt())
        del self._embeds, self._media_mask
        self._captured = None
        for token in self.reply_ids:
            self._accept(token)  # the hand-off, the text and, at the last, ThinkerDone


class Qwen3Thinker(Thinker):
    """The Thinker stage of a Qwen3-Omni model (Qwen3OmniMoeThinkerForConditionalGeneration); the same `generate`
    interface as omni.thinker.Thinker."""

    sequence_cls = Qwen3ThinkerSequence
    forced_reply_cls = Qwen3ForcedReplySequence

    def __init__(
        self,
        thinker_model,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        max_model_len: int = 32768,
        talker_config=None,
        im_start_id: int | None = None,
        assistant_id: int | None = None,
    ):
        super().__init__(thinker_model, tokenizer, config, max_model_len)
        cfg = self.cfg
        self.hidden_size = cfg.text_config.hidden_size
        self.deepstack_levels = len(cfg.vision_config.deepstack_visual_indexes)
        self.user_id = cfg.user_token_id
        self.im_start_id = im_start_id if im_start_id is not None else tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.assistant_id = assistant_id if assistant_id is not None else tokenizer.convert_tokens_to_ids("assistant")
        self.accept_layer = None if talker_config is None else int(talker_config.accept_hidden_layer)

    def forward(self, x, pos, mask, cache, capture=None, **deepstack):
        """The engine's forward with deepstack features; `capture` (a dict) gets "hidden": the output of decoder
        layer accept_hidden_layer - 1 (HF's hidden_states[accept_hidden_layer], pre-deepstack) for the Talker."""
        hook, accept, layers = None, self.accept_layer, self.lm.layers
        if capture is not None and accept is not None and 0 < accept < len(layers):

            def keep(mod, args, out):
                capture["hidden"] = out[0] if isinstance(out, tuple) else out

            hook = layers[accept - 1].register_forward_hook(keep)
        try:
            out = self.lm(
                inputs_embeds=x, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True, **deepstack
            )
        finally:
            if hook is not None:
                hook.remove()
        if capture is not None and "hidden" not in capture:  # accept_hidden_layer 0 or n: embeddings or final
            capture["hidden"] = x if accept == 0 else out.last_hidden_state
        return out.last_hidden_state

    @classmethod
    def from_model(
        cls, model, tokenizer, config: EngineConfig = EngineConfig(), max_model_len: int = 32768
    ) -> Qwen3Thinker:
        """From a loaded Qwen3OmniMoeForConditionalGeneration (the talker's accept layer and the role ids from its
        config)."""
        c = model.config
        talker_config = c.talker_config if getattr(model, "has_talker", False) else None
        return cls(
            model.thinker, tokenizer, config, max_model_len, talker_config, c.im_start_token_id, c.assistant_token_id
        )

    @classmethod
    def from_thinker(
        cls, thinker_model, tokenizer, config: EngineConfig, max_model_len: int, model_config
    ) -> Qwen3Thinker:
        """From the thinker alone and the whole checkpoint's config (Qwen3OmniMoeConfig): the talker's accept layer
        when the checkpoint speaks, the role ids."""
        c = model_config
        talker_config = c.talker_config if c.enable_audio_output else None
        return cls(
            thinker_model, tokenizer, config, max_model_len, talker_config, c.im_start_token_id, c.assistant_token_id
        )
