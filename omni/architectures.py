"""One record per architecture, chosen once from the checkpoint's config (`architecture(cfg)`): the stage classes,
the transformers classes, the reference function, the tiny builder and the defaults. Every place that differs between
Qwen2.5-Omni and Qwen3-Omni reads this record; no module outside this one compares the architecture's name
(tests/test_layout.py checks it).

Classes are named by import path ("module:attribute") and imported on first use: omni/ does not import encoders/,
decoders/ or serve/, yet the record names their classes.

    stage      qwen2.5-omni                          qwen3-omni
    encoders   encoders.vision.VisionEncoder,        encoders.qwen3.Qwen3VisionEncoder (deepstack),
               encoders.audio.AudioEncoder           encoders.qwen3.Qwen3AudioEncoder
    thinker    omni.thinker.Thinker                  omni.thinker_qwen3.Qwen3Thinker (MoE)
    talker     omni.talker.Talker                    omni.talker_qwen3.Qwen3Talker (+ code predictor)
    vocoder    decoders.token2wav.Token2Wav          decoders.code2wav.Code2Wav
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Architecture",
    "ARCHITECTURES",
    "ARCHS",
    "architecture",
    "architecture_of_tower",
    "QWEN25_OMNI",
    "QWEN3_OMNI",
]

_Q25 = "transformers.models.qwen2_5_omni.modeling_qwen2_5_omni"
_Q3 = "transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"


@dataclass(frozen=True)
class Architecture:
    name: str  # what users and config files say: "qwen2.5-omni" | "qwen3-omni"
    model_type: str  # config.json's model_type
    # transformers classes ("module:Class")
    hf_model: str  # the whole checkpoint (thinker, talker, vocoder)
    hf_thinker: str  # the thinker alone (language model + towers)
    hf_talker: str  # the talker alone
    hf_vision_tower: str
    hf_audio_tower: str
    # omni's stage classes ("module:Class"); the encoders and vocoders live in omni.encoders / omni.decoders
    thinker: str
    talker: str
    vocoder: str
    vision_encoder: str
    audio_encoder: str
    reference: str  # the official generate of this architecture, as omni.reference.reference_generate's oracle
    build_tiny: str  # the tiny / small checkpoint builder: (dir, preset=, seed=, ...) -> Path
    vocoder_config: str  # the serving config section the vocoder and the Talker's first-audio threshold read
    # defaults and quirks
    voices_in_config: bool  # voices: config.json's talker_config.speaker_id (Qwen3), else spk_dict.pt (Qwen2.5)
    talker_rows: str  # what the Talker reads of the Thinker's embedding table: "speakers+tts_text" (the speakers'
    #                   bos and tts_text_* rows, Qwen2.5) or "tts_specials" (tts_bos / eos / pad, Qwen3)
    talker_reads_thinker_audio_config: bool  # transformers 5.23-5.25 gap: the Qwen3 talker's get_rope_index reads
    #                                          talker_config.audio_config, which only the thinker's config declares
    vocoder_float32: bool  # the official path runs the vocoder in float32 (Token2Wav), else in the serving dtype
    tiny_suffix: str  # make-tiny's preset name: f"{preset}{tiny_suffix}" ("tiny", "tiny-qwen3")
    text_only_checkpoints: bool  # whether make-tiny can build one without speech output (Thinking / Captioner)

    def load(self, field: str) -> Any:
        """The class or function a "module:attribute" field names, imported now."""
        module, _, attr = getattr(self, field).partition(":")
        return getattr(importlib.import_module(module), attr)


QWEN25_OMNI = Architecture(
    name="qwen2.5-omni",
    model_type="qwen2_5_omni",
    hf_model="transformers:Qwen2_5OmniForConditionalGeneration",
    hf_thinker="transformers:Qwen2_5OmniThinkerForConditionalGeneration",
    hf_talker="transformers:Qwen2_5OmniTalkerForConditionalGeneration",
    hf_vision_tower=f"{_Q25}:Qwen2_5OmniVisionEncoder",
    hf_audio_tower=f"{_Q25}:Qwen2_5OmniAudioEncoder",
    thinker="omni.thinker:Thinker",
    talker="omni.talker:Talker",
    vocoder="omni.decoders.token2wav:Token2Wav",
    vision_encoder="omni.encoders.vision:VisionEncoder",
    audio_encoder="omni.encoders.audio:AudioEncoder",
    reference="omni.reference:reference_generate_qwen25",
    build_tiny="omni.tiny:build_checkpoint",
    vocoder_config="vocoder",
    voices_in_config=False,
    talker_rows="speakers+tts_text",
    talker_reads_thinker_audio_config=False,
    vocoder_float32=True,
    tiny_suffix="",
    text_only_checkpoints=False,
)

QWEN3_OMNI = Architecture(
    name="qwen3-omni",
    model_type="qwen3_omni_moe",
    hf_model="transformers:Qwen3OmniMoeForConditionalGeneration",
    hf_thinker="transformers:Qwen3OmniMoeThinkerForConditionalGeneration",
    hf_talker="transformers:Qwen3OmniMoeTalkerForConditionalGeneration",
    hf_vision_tower=f"{_Q3}:Qwen3OmniMoeVisionEncoder",
    hf_audio_tower=f"{_Q3}:Qwen3OmniMoeAudioEncoder",
    thinker="omni.thinker_qwen3:Qwen3Thinker",
    talker="omni.talker_qwen3:Qwen3Talker",
    vocoder="omni.decoders.code2wav:Code2Wav",
    vision_encoder="omni.encoders.qwen3:Qwen3VisionEncoder",
    audio_encoder="omni.encoders.qwen3:Qwen3AudioEncoder",
    reference="omni.reference_qwen3:reference_generate_qwen3",
    build_tiny="omni.tiny_qwen3:build_qwen3_checkpoint",
    vocoder_config="code2wav",
    voices_in_config=True,
    talker_rows="tts_specials",
    talker_reads_thinker_audio_config=True,
    vocoder_float32=False,
    tiny_suffix="-qwen3",
    text_only_checkpoints=True,
)

ARCHITECTURES = {a.name: a for a in (QWEN25_OMNI, QWEN3_OMNI)}
ARCHS = tuple(ARCHITECTURES)
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
_BY_HF_CLASS = {a.hf_model.partition(":")[2]: a for a in ARCHITECTURES.values()}


def architecture(cfg: dict | str) -> Architecture:
    """The record of a checkpoint's config.json (a dict: `model_type`, else `architectures`), or of a name
    ("qwen2.5-omni" | "qwen3-omni"); ValueError for anything else."""
    if isinstance(cfg, str):
        if cfg not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {cfg!r}; supported: {', '.join(ARCHS)}")
        return ARCHITECTURES[cfg]
    arch = _BY_MODEL_TYPE.get(cfg.get("model_type", ""))
    for name in cfg.get("architectures") or []:
        arch = arch or _BY_HF_CLASS.get(name)
    if arch is None:
        raise ValueError(
            f"not a Qwen-Omni checkpoint (model_type {cfg.get('model_type')!r}, architectures "
            f"{cfg.get('architectures')}); supported: {', '.join(_BY_HF_CLASS)}"
        )
    return arch


def architecture_of_tower(module) -> Architecture:
    """The record whose vision or audio tower class `module` is (an instance of, or a subclass of one)."""
    names = {c.__name__ for c in type(module).__mro__}
    for arch in ARCHITECTURES.values():
        if {arch.hf_vision_tower.partition(":")[2], arch.hf_audio_tower.partition(":")[2]} & names:
            return arch
    raise ValueError(f"{type(module).__name__} is not a Qwen-Omni encoder tower")
