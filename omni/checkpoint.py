"""Resolving and loading checkpoints: `tiny` / `small` (built on first use into a cache), a local directory, or a
hub id of the real Qwen2.5-Omni-3B/7B (`Qwen/Qwen2.5-Omni-7B`), loaded with transformers' own classes."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.tiny import PRESETS, build_checkpoint
from omni.types import SamplingParams

__all__ = ["LoadedModel", "resolve_model", "load_model", "list_voices", "generation_defaults", "cache_dir", "RECIPE_VERSION"]

RECIPE_VERSION = 2  # bump when tiny.py changes what it writes: the cached copies are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("OMNI_CACHE", Path.home() / ".cache" / "omni"))


def resolve_model(model: str) -> str:
    """`tiny`/`small` -> a cached checkpoint directory (built once, under a file lock); an existing directory -> itself;
    anything else is passed on as a hub id."""
    if model in PRESETS:
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"{model}-v{RECIPE_VERSION}"
        with open(root / f".{model}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several processes (Ray replicas, pytest workers) may ask at once
            if not (target / "model.safetensors").exists():
                tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{model}-"))
                build_checkpoint(tmp, preset=model)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
        return str(target)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Qwen2.5-Omni checkpoint directory")
        return str(path)
    if os.sep in model and not model.count("/") == 1:
        raise FileNotFoundError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}), a directory nor a hub id")
    return model  # hub id, e.g. Qwen/Qwen2.5-Omni-7B


@dataclass
class LoadedModel:
    name: str  # what the user asked for ("tiny", a path, a hub id)
    path: str  # resolved directory or hub id
    model: "torch.nn.Module"  # Qwen2_5OmniForConditionalGeneration, eval mode
    processor: object  # Qwen2_5OmniProcessor

    @property
    def voices(self) -> list[str]:
        return sorted(self.model.speaker_map)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def list_voices(model: str) -> list[str]:
    """The voices of a checkpoint (keys of its spk_dict.pt), without loading the model."""
    path = resolve_model(model)
    local = Path(path) / "spk_dict.pt"
    if not local.exists():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(path, "spk_dict.pt"))
    return sorted(torch.load(local, map_location="cpu", weights_only=True))


def generation_defaults(model: str) -> SamplingParams:
    """The Thinker's sampling defaults from the checkpoint's generation_config.json (greedy where it says nothing)."""
    from transformers import GenerationConfig

    try:
        gc = GenerationConfig.from_pretrained(resolve_model(model))
    except OSError:
        return SamplingParams()
    penalty = float(gc.repetition_penalty or 1.0)
    if not gc.do_sample:
        return SamplingParams(repetition_penalty=penalty)
    return SamplingParams(temperature=float(gc.temperature or 1.0), top_p=float(gc.top_p or 1.0),
                          top_k=int(gc.top_k) if gc.top_k else -1, repetition_penalty=penalty)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str = "tiny", device: str | None = None, dtype: str | torch.dtype | None = None,
               enable_audio_output: bool = True) -> LoadedModel:
    """Load model + processor. dtype defaults to float32 on CPU and bfloat16 on CUDA (the real weights' dtype)."""
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    path = resolve_model(model)
    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    net = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                              enable_audio_output=enable_audio_output)
    net = net.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return LoadedModel(name=model, path=path, model=net, processor=processor)
