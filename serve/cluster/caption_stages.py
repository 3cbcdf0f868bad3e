"""The three stages of `omni caption` (serve/cluster/caption.py composes them as a Ray Data pipeline):
`decode_batch` (a task: read, sniff, decode, prompt), `CaptionEncoders` (an actor: the towers, batched) and
`CaptionGenerator` (an actor: the continuous-batching Thinker, and the Talker + vocoder with --speak).

Every stage keeps one row per file: a file that fails gets its `error` set and is passed through by the later
stages. Columns are arrow-friendly ("" for no error / no type: a column of only None would not stay a string);
`payload` is the one binary column: a pickled (PreparedPrompt, Generation) after decoding, a pickled
(PromptLayout, Generation, MediaEmbeddings) after the encoders, dropped by the generator. The Generation (sampling,
voice, speech limits) is the request's own, built once by the decode stage from `caption_request`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import time

import numpy as np

from omni.serve.caption_io import DEFAULT_PROMPTS, caption_request, load_file, one_line
from omni.serve.cluster.caption_options import CaptionOptions

__all__ = ["decode_batch", "CaptionEncoders", "CaptionGenerator"]


# ---------------------------------------------------------------------------------------------------- stage 1: decode
@functools.lru_cache(maxsize=2)
def _processor(model: str):
    from transformers import AutoProcessor

    from omni.checkpoint import resolve_model

    return AutoProcessor.from_pretrained(resolve_model(model))


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def decode_batch(batch: dict, opts: CaptionOptions) -> dict:
    """Read, sniff, decode and build the prompt of each file; a file that fails becomes an error row here.
    batch: {path: [n] str, rel: [n] str} -> + media_type, prompt, error, payload (pickled (PreparedPrompt,
    Generation)), timing."""
    from omni.serve.compose import prepare_and_check

    _set_threads(1)
    processor, node = _processor(opts.model), _node()
    out: dict[str, list] = {
        k: [] for k in ("path", "rel", "media_type", "prompt", "error", "payload", "decode_s", "decode_node")
    }
    for path, rel in zip(batch["path"], batch["rel"]):
        t0 = time.perf_counter()
        kind, prompt, error, payload = "", opts.prompt or "", "", b""  # "" for none: an all-None column is no string
        try:
            kind, media = load_file(str(path), opts.use_audio_in_video)
            prompt = opts.prompt or DEFAULT_PROMPTS[kind]
            request = caption_request(
                kind,
                media,
                prompt,
                opts.max_tokens,
                opts.use_audio_in_video,
                speak=opts.speak_dir is not None,
                voice=opts.voice,
                max_speech_tokens=opts.max_speech_tokens,
            )
            prepared = prepare_and_check(processor, request, opts.config.max_model_len)  # the composition's check
            payload = pickle.dumps((prepared, request.generation))
        except Exception as e:  # noqa: BLE001 - per file: whatever a decoder raises on bad bytes is that file's error
            kind = getattr(e, "media_type", kind) or ""
            prompt = opts.prompt or DEFAULT_PROMPTS.get(kind, "")
            error = one_line(e) if str(e) else type(e).__name__
        for k, v in (
            ("path", str(path)),
            ("rel", str(rel)),
            ("media_type", kind),
            ("prompt", prompt),
            ("error", error),
            ("payload", payload),
            ("decode_s", time.perf_counter() - t0),
            ("decode_node", node),
        ):
            out[k].append(v)
    return {k: np.array(v, dtype=object) if k != "decode_s" else np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- stage 2: encode
class CaptionEncoders:
    """The vision and audio towers (one thinker load), batched: all images of a batch in one call, all videos in one,
    all audios in one. If a batched call fails, its rows are redone one by one, so only the culprit errs."""

    def __init__(self, opts: CaptionOptions):
        from omni.encoders import EncoderConfig, load_encoders

        if not opts.device.startswith("cuda"):
            _set_threads(max(1, int(opts.encoder_cpus)))
        self.vision, self.audio = load_encoders(
            opts.model, EncoderConfig(device=opts.device, dtype=opts.dtype, max_batch_items=max(16, opts.batch_size))
        )
        self.node = _node()
        self.ready_at = time.time()  # wall clock when this actor was set up (process started, model loaded)

    def _encode(self, prompts: list) -> list:
        """[PreparedPrompt] -> [MediaEmbeddings], three batched calls in all."""
        from omni.encoders.video import encode_prompts

        return encode_prompts(prompts, self.vision, self.audio)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        n = len(batch["path"])
        todo = [j for j in range(n) if not batch["error"][j]]
        decoded = {j: pickle.loads(batch["payload"][j]) for j in todo}  # (prompt, generation)
        prompts = {j: prompt for j, (prompt, _) in decoded.items()}
        errors = list(batch["error"])
        payload = list(batch["payload"])
        try:
            media = dict(zip(todo, self._encode([prompts[j] for j in todo])))
        except Exception:  # noqa: BLE001 - find the row that fails, keep the others
            media = {}
            for j in todo:
                try:
                    media[j] = self._encode([prompts[j]])[0]
                except Exception as e:  # noqa: BLE001
                    errors[j] = one_line(f"encoder failed: {type(e).__name__}: {e}")
        for j in todo:
            # the generator reads the layout and the embeddings, never the pixels or features
            payload[j] = pickle.dumps((prompts[j].layout, decoded[j][1], media[j])) if j in media else b""
        per_file = (time.perf_counter() - t0) / max(1, len(todo))
        return {
            **batch,
            "error": np.array(errors, dtype=object),
            "payload": np.array(payload, dtype=object),
            "encode_s": np.array([per_file if j in media else 0.0 for j in range(n)]),
            "encode_node": np.array([self.node] * n, dtype=object),
            "encode_ready_at": np.array([self.ready_at] * n),
        }


# ---------------------------------------------------------------------------------------------------- stage 3: Thinker
class CaptionGenerator:
    """The Thinker's continuous-batching engine: every row of a batch (and of up to `thinker_calls` batches at once)
    joins one running batch, one batched forward per decode step. With speak_dir, the Talker and the vocoder run in
    the same actor (the in-process pipeline's stages: the hand-offs stay in process) and each row carries its speech
    as 16-bit PCM. The stages' items become a ChatResult through the composition's own `finish` and `collect`."""

    def __init__(self, opts: CaptionOptions):
        self.opts = opts
        config = opts.config
        if opts.speak_dir is not None:
            from omni.checkpoint import load_model
            from omni.serve.pipeline import Pipeline

            self.pipeline = Pipeline(load_model(opts.model, device=opts.device, dtype=opts.dtype), config)
            self.thinker = self.pipeline.thinker
        else:  # the thinker's weights only, of the checkpoint's architecture
            from omni.serve.models import load_thinker

            self.thinker = load_thinker(opts.model, config.thinker, config.max_model_len, opts.device, opts.dtype)
        if not opts.device.startswith("cuda"):
            _set_threads(opts.thinker_threads or max(1, (os.cpu_count() or 2) // 2))
        self.node, self.pid = _node(), os.getpid()
        self.ready_at = time.time()

    async def _one(self, prompt, gen, media) -> tuple[str, int, bytes]:
        """-> (caption, generated tokens, speech as 16-bit PCM or b"")."""
        from omni.serve.api.audio_io import pcm16_bytes
        from omni.serve.compose import collect, finish

        if gen.speak:
            items = self.pipeline.stages.generate(gen, prompt, media)
        else:
            items = self.thinker.generate(gen.request_id, prompt, media, gen.sampling)
        result = await collect(finish(items, prompt_tokens=int(prompt.input_ids.shape[0])))
        speech = pcm16_bytes(result.waveform) if result.waveform is not None and len(result.waveform) else b""
        return result.text, len(result.token_ids), speech

    async def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        errors = list(batch["error"])
        captions, tokens, speech, secs = [""] * n, [0] * n, [b""] * n, [0.0] * n

        async def run(j: int) -> None:
            t0 = time.perf_counter()
            try:
                captions[j], tokens[j], speech[j] = await self._one(*pickle.loads(batch["payload"][j]))
            except Exception as e:  # noqa: BLE001 - per row: a prompt over the context, a failing request
                errors[j] = one_line(f"{type(e).__name__}: {e}")
            secs[j] = time.perf_counter() - t0

        await asyncio.gather(*(run(j) for j in range(n) if not errors[j]))
        rest = {k: v for k, v in batch.items() if k != "payload"}
        return {
            **rest,
            "error": np.array(errors, dtype=object),
            "caption": np.array(captions, dtype=object),
            "num_tokens": np.array(tokens),
            "speech": np.array(speech, dtype=object),
            "thinker_s": np.array(secs),
            "thinker_node": np.array([self.node] * n, dtype=object),
            "thinker_pid": np.array([self.pid] * n),
            "thinker_ready_at": np.array([self.ready_at] * n),
        }
