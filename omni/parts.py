"""Loading one part of a checkpoint, so that each replica holds only the weights it runs (DESIGN: "Each replica loads
only the weights it runs"):

    talker   `load_talker_part`: the talker (Qwen2.5: + the voices of spk_dict.pt), and of the Thinker only the few
             input-embedding rows it reads (Qwen2.5: the speakers' bos ids and tts_text_*; Qwen3: tts_bos/eos/pad)
    towers   `load_tower`: `thinker.visual` or `thinker.audio_tower` alone
    vocoder  omni.decoders' Token2Wav.from_pretrained / Code2Wav.from_pretrained (the `token2wav.` / `code2wav.`
             tensors only, already so)

The weights go through transformers' own loader (`from_pretrained`, with its key renaming and, for the Qwen3 talker's
MoE layers, its per-expert -> fused expert conversion), so a part's tensors are exactly the full model's. Checkpoint
tensors of the other parts are never read: safetensors opens the files lazily, and only the shards that hold a part's
keys are touched (a sharded checkpoint's index names them). The embedding rows are read as slices of the table.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Optional

import torch

from omni.architectures import Architecture, architecture
from omni.checkpoint import check_model, default_device, default_dtype

__all__ = ["TalkerPart", "EmbeddingRows", "load_talker_part", "load_tower", "embedding_rows", "TOWERS"]

TOWERS = ("visual", "audio_tower")  # the thinker's encoder towers, by their attribute name (thinker.model.<name>)
# the thinker's input embedding table: the original checkpoints' key, then the transformers-5 layout's
_EMBED_KEYS = ("thinker.model.embed_tokens.weight", "thinker.model.language_model.embed_tokens.weight")


class EmbeddingRows(torch.nn.Module):
    """A few rows of an embedding table, looked up by their ids in the full vocabulary: what the Qwen2.5 Talker needs
    of the Thinker's input embedding (a handful of [H] rows instead of the [vocab, H] table, 545 M values at 7B)."""

    def __init__(self, ids: list[int], rows: torch.Tensor):
        super().__init__()
        if rows.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids but {rows.shape[0]} rows")
        self.ids = list(ids)
        self._index = {int(i): n for n, i in enumerate(ids)}  # vocabulary id -> row
        self.weight = torch.nn.Parameter(rows, requires_grad=False)  # [n_ids, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: any shape of vocabulary ids among `self.ids` -> [*ids.shape, H]."""
        try:
            rows = [self._index[int(i)] for i in ids.reshape(-1).tolist()]
        except KeyError as exc:
            raise KeyError(f"embedding row of id {exc.args[0]} not loaded (have {sorted(self._index)})") from None
        return self.weight[torch.tensor(rows, device=self.weight.device)].reshape(*ids.shape, -1)


def _files_for(path: str, prefixes: tuple[str, ...]) -> list[str]:
    """The safetensors files that hold keys under `prefixes` (one file, or the shards the index names)."""
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if not index:
        return [cached_file(path, "model.safetensors")]
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    return [cached_file(path, file) for file in sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})]


def embedding_rows(path: str, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the thinker's input embedding table, read as slices (the table is never loaded whole)."""
    from safetensors import safe_open

    for file in _files_for(path, _EMBED_KEYS):
        with safe_open(file, "pt") as st:
            key = next((k for k in _EMBED_KEYS if k in st.keys()), None)
            if key is not None:
                table = st.get_slice(key)
                return torch.cat([table[i : i + 1] for i in ids]).to(dtype)  # [len(ids), H]
    raise KeyError(f"{path}: no thinker embedding table (looked for {', '.join(_EMBED_KEYS)})")


@functools.cache
def _only(arch: Architecture, parts: tuple[str, ...]) -> type:
    """The architecture's whole-model class building only `parts` of itself: the same module paths, config and
    conversion mapping as the whole model (its class name is kept: transformers looks conversions up by it), the
    other parts' checkpoint keys expected and skipped."""
    cls = arch.load("hf_model")

    def __init__(self, config):
        super(cls, self).__init__(config)  # the PreTrainedModel base, not the whole model's constructor
        self.has_talker = "talker" in parts
        self.speaker_map = {}  # Qwen2.5's from_pretrained fills it from spk_dict.pt
        if "talker" in parts:
            self.talker = arch.load("hf_talker")._from_config(config.talker_config)
        self.post_init()

    others = tuple(rf"^{p}\." for p in ("thinker", "talker", "token2wav", "code2wav") if p not in parts)
    return type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "__module__": cls.__module__, "_keys_to_ignore_on_load_unexpected": list(others)},
    )


def _dtype(device: str, dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype or default_dtype(device))


@dataclass
class TalkerPart:
    """What the Talker stage runs, and nothing else of the checkpoint."""

    arch: str  # the architecture's name (omni.architectures)
    talker: torch.nn.Module  # Qwen2_5OmniTalkerForConditionalGeneration | Qwen3OmniMoeTalkerForConditionalGeneration
    speakers: dict  # Qwen2.5: spk_dict.pt {voice: {bos_token, cond, ref_mel}}; Qwen3: {} (voices are in its config)
    thinker_embed: Optional[EmbeddingRows]  # Qwen2.5: the Thinker's input-embedding rows it reads; Qwen3: None
    tts_embeds: Optional[torch.Tensor]  # Qwen3: [3, H_thinker] the Thinker's embeddings of tts_bos, tts_eos, tts_pad
    tts_pad_id: Optional[int]  # Qwen3: the tts_pad id (thinker vocabulary)


def load_talker_part(model: str, device: Optional[str] = None, dtype=None) -> TalkerPart:
    """The talker of a checkpoint with speech output, without the thinker, token2wav or code2wav."""
    path, cfg, arch = check_model(model)
    if not cfg.get("enable_audio_output", True):
        raise ValueError(f"{model} has no speech output (no talker)")
    device = device or default_device()
    dtype = _dtype(device, dtype)
    arch = architecture(arch)
    net = _only(arch, ("talker",)).from_pretrained(path, dtype=dtype)
    talker = net.talker.to(device).eval()
    if arch.talker_reads_thinker_audio_config:
        # transformers 5.23-5.25 gap (as omni.checkpoint.load_model): the talker's get_rope_index reads
        # talker_config.audio_config, which only the thinker's config declares
        talker.config.audio_config = net.config.thinker_config.audio_config
    if arch.talker_rows == "tts_specials":  # Qwen3: the Thinker's rows of tts_bos, tts_eos, tts_pad
        c = net.config
        ids = [int(c.tts_bos_token_id), int(c.tts_eos_token_id), int(c.tts_pad_token_id)]
        return TalkerPart(arch.name, talker, {}, None, embedding_rows(path, ids, dtype).to(device), ids[2])
    tc = talker.config  # Qwen2.5: the speakers' bos rows and tts_text_*
    speakers = net.speaker_map
    ids = sorted(
        {int(s["bos_token"]) for s in speakers.values()}
        | {int(tc.tts_text_start_token_id), int(tc.tts_text_end_token_id), int(tc.tts_text_pad_token_id)}
    )
    rows = EmbeddingRows(ids, embedding_rows(path, ids, dtype)).to(device)
    return TalkerPart(arch.name, talker, speakers, rows, None, None)


@functools.cache
def _tower_class(cls: type) -> type:
    """`cls` with the rest of the checkpoint's keys expected and skipped (no load report listing them)."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "_keys_to_ignore_on_load_unexpected": [r".*"]})


def load_tower(model: str, name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One encoder tower of the thinker (`name`: "visual" or "audio_tower"), alone, in `dtype`, on the CPU: the
    module that `load_model(model).model.thinker.model.<name>` is, with the same weights."""
    if name not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {name!r}")
    path, cfg, arch = check_model(model)
    from transformers import AutoConfig

    thinker = AutoConfig.from_pretrained(path).thinker_config
    record = architecture(arch)
    cls, sub = (
        (record.load("hf_vision_tower"), thinker.vision_config)
        if name == "visual"
        else (record.load("hf_audio_tower"), thinker.audio_config)
    )
    # checkpoint keys thinker.visual.* (original layout) or thinker.model.visual.* (transformers-5 layout) -> visual.*
    return (
        _tower_class(cls)
        .from_pretrained(path, config=sub, dtype=dtype, key_mapping={rf"^thinker\.(model\.)?{name}\.": ""})
        .eval()
    )
