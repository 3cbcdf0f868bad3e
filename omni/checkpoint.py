"""Resolving and loading checkpoints: `tiny` / `small` / `tiny-qwen3` / `small-qwen3` (built on first use into a
cache), a local directory, or a hub id of a real one (`Qwen/Qwen2.5-Omni-7B`, `Qwen/Qwen3-Omni-30B-A3B-Instruct`),
loaded with transformers' own classes. The architecture is read from the checkpoint's config.json (`model_type`,
else `architectures`), never from a flag: `model_arch(path)` -> "qwen2.5-omni" | "qwen3-omni"."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.architectures import ARCHS, QWEN3_OMNI, QWEN25_OMNI, Architecture, architecture
from omni.tiny import PRESETS
from omni.tiny_qwen3 import QWEN3_PRESETS
from omni.types import SamplingParams

__all__ = [
    "LoadedModel",
    "resolve_model",
    "load_model",
    "list_voices",
    "generation_defaults",
    "cache_dir",
    "model_arch",
    "model_architecture",
    "default_dtype",
    "model_config",
    "check_model",
    "check_versions",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotOmniModelError",
    "VersionError",
    "ARCHS",
    "ALL_PRESETS",
    "RECIPE_VERSION",
    "QWEN3_RECIPE_VERSION",
    "TRANSFORMERS_REQUIREMENT",
]

RECIPE_VERSION = 2  # bump when tiny.py changes what it writes: the cached copies are rebuilt
QWEN3_RECIPE_VERSION = 1  # the same for tiny_qwen3.py
ALL_PRESETS = {
    **{name: (QWEN25_OMNI, RECIPE_VERSION) for name in PRESETS},
    **{name: (QWEN3_OMNI, QWEN3_RECIPE_VERSION) for name in QWEN3_PRESETS},
}


TRANSFORMERS_REQUIREMENT = ">=5.24,<6"  # as pyproject.toml: the Omni classes' 5.x layout, get_rope_index, cache API


class VersionError(RuntimeError):
    """An installed package outside the versions omni is built for (one line: which, what is installed, the fix)."""


def check_versions() -> None:
    """Raise VersionError unless the installed transformers satisfies TRANSFORMERS_REQUIREMENT. Every loader calls it
    (through check_model), and the CLI before anything else."""
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = str(getattr(transformers, "__version__", "unknown"))
    try:
        ok = Version(found) in SpecifierSet(TRANSFORMERS_REQUIREMENT, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise VersionError(
            f"transformers {found} is installed but omni needs transformers{TRANSFORMERS_REQUIREMENT}: "
            f"pip install 'transformers{TRANSFORMERS_REQUIREMENT}'"
        )


class ModelLoadError(Exception):
    """A model that cannot be loaded, said in one line: `cannot load model 'X': <the cause>`."""

    def __init__(self, model: str, reason: str):
        self.model, self.reason = model, reason
        super().__init__(f"cannot load model {model!r}: {reason}")


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No such directory, a directory without config.json or weights, or a hub id that cannot be fetched."""


class NotOmniModelError(ModelLoadError, ValueError):
    """A checkpoint that is not a Qwen2.5-Omni / Qwen3-Omni (its config.json says another architecture)."""


def _looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything absolute, relative (./, ../, ~) or deeper is a local path."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def cache_dir() -> Path:
    return Path(os.environ.get("OMNI_CACHE", Path.home() / ".cache" / "omni"))


def resolve_model(model: str) -> str:
    """A preset (`tiny`, `small`, `tiny-qwen3`, `small-qwen3`) -> a cached checkpoint directory (built once, under a
    file lock); an existing directory -> itself; anything else is passed on as a hub id."""
    if model in ALL_PRESETS:
        arch, version = ALL_PRESETS[model]
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"{model}-v{version}"
        with open(root / f".{model}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several processes (Ray replicas, pytest workers) may ask at once
            if not (target / "model.safetensors").exists():
                tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{model}-"))
                arch.load("build_tiny")(tmp, preset=model)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
        return str(target)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(model, f"{path} has no config.json: not a checkpoint directory")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(model, f"{path} is a file, not a checkpoint directory")
    if _looks_like_path(model):
        raise ModelNotFoundError(
            model,
            f"not found locally (no such directory {path}); pass a checkpoint directory, "
            f"a preset ({', '.join(ALL_PRESETS)}) or a hub id (Qwen/Qwen2.5-Omni-7B)",
        )
    return model  # hub id, e.g. Qwen/Qwen2.5-Omni-7B


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable(timeout: float = 3.0) -> str:
    """'' when the hub's host answers a TCP connection within `timeout`, else why not (one short phrase): a quick
    probe instead of huggingface_hub's five retries (~25 s) before it says the same."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return ""  # the proxy decides: let the download say
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    return ""


def _config_path(model: str, path: str) -> str:
    """config.json of a resolved checkpoint (a directory, or a hub id: from the local HF cache, else fetched), or a
    ModelNotFoundError that says why not."""
    if Path(path).is_dir():
        return str(Path(path) / "config.json")
    from huggingface_hub import errors, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return cached
    hint = "pass a local checkpoint path"
    if _hub_offline():
        raise ModelNotFoundError(
            model,
            f"not found locally (no such directory) nor in the Hugging Face cache, and "
            f"the hub is offline (HF_HUB_OFFLINE=1); {hint}",
        )
    unreachable = _hub_unreachable()
    if unreachable:
        raise ModelNotFoundError(
            model,
            f"not found locally (no such directory) nor in the Hugging Face cache, and "
            f"the hub is unreachable ({unreachable}); {hint}",
        )
    try:
        return hf_hub_download(path, "config.json")
    except errors.LocalEntryNotFoundError:  # the transport failed after the probe (a subclass of EntryNotFoundError)
        raise ModelNotFoundError(
            model,
            f"not found locally (no such directory) nor in the Hugging Face cache, and the hub is unreachable; {hint}",
        ) from None
    except errors.GatedRepoError:
        raise ModelNotFoundError(
            model,
            "a gated repository on the hub: accept its terms and log in "
            "(hf auth login), or pass a local checkpoint path",
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.HFValidationError):
        raise ModelNotFoundError(
            model, f"not found locally (no such directory) nor on the Hugging Face hub; {hint}"
        ) from None
    except errors.EntryNotFoundError:
        raise ModelNotFoundError(model, "the hub repository has no config.json: not a checkpoint") from None
    except Exception as exc:  # connection refused, DNS, timeouts, proxies: whatever the transport raises
        cause = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            model, f"not found locally (no such directory) and the hub is unreachable ({cause}); {hint}"
        ) from None


def check_model(model: str) -> tuple[str, dict, str]:
    """Resolve `model` and read its config, before anything heavy starts: -> (path, config.json as a dict, arch).
    Raises VersionError (transformers outside TRANSFORMERS_REQUIREMENT) or a ModelLoadError whose message is the one
    line to show: no such directory, no config.json or weights, a hub id not cached while the hub is offline or
    unreachable, a config of another architecture."""
    check_versions()
    path = resolve_model(model)
    config_file = _config_path(model, path)
    try:
        with open(config_file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(model, f"cannot read {config_file}: {exc}") from None
    if not isinstance(cfg, dict):
        raise NotOmniModelError(model, f"{config_file} is not a JSON object")
    try:
        arch = model_arch(cfg)
    except ValueError as exc:
        raise NotOmniModelError(model, str(exc)) from None
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in _WEIGHT_FILES):
        raise ModelNotFoundError(model, f"{path} has config.json but no weights ({' or '.join(_WEIGHT_FILES)})")
    return path, cfg, arch


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def model_config(model: str) -> dict:
    """The checkpoint's config.json as a dict (a preset is built first; a hub id is fetched)."""
    with open(_config_path(model, resolve_model(model))) as f:
        return json.load(f)


def model_arch(model: str | dict) -> str:
    """ "qwen2.5-omni" or "qwen3-omni", from config.json's `model_type` (else `architectures`); ValueError for
    anything else. `model`: a preset, a directory, a hub id, or a config dict already read."""
    return model_architecture(model).name


def model_architecture(model: str | dict) -> Architecture:
    """The architecture's record (omni.architectures), from config.json as `model_arch` reads it."""
    return architecture(model if isinstance(model, dict) else model_config(model))


def _config_voices(cfg: dict) -> list[str]:
    """Qwen3-Omni's voices, from config.json (talker_config.speaker_id); [] for a text-only checkpoint."""
    if not cfg.get("enable_audio_output", True):
        return []
    return sorted(name.capitalize() for name in (cfg.get("talker_config") or {}).get("speaker_id") or {})


@dataclass
class LoadedModel:
    name: str  # what the user asked for ("tiny", a path, a hub id)
    path: str  # resolved directory or hub id
    model: torch.nn.Module  # Qwen2_5OmniForConditionalGeneration or Qwen3OmniMoeForConditionalGeneration, eval
    processor: object  # Qwen2_5OmniProcessor or Qwen3OmniMoeProcessor
    arch: str = QWEN25_OMNI.name  # one of ARCHS; `architecture` is its record

    @property
    def has_speech(self) -> bool:
        return bool(getattr(self.model, "has_talker", False))

    @property
    def voices(self) -> list[str]:
        """The voices this model speaks with; [] when it has no speech output (a text-only checkpoint)."""
        if not self.has_speech:
            return []
        if self.architecture.voices_in_config:
            return sorted(name.capitalize() for name in self.model.config.talker_config.speaker_id)
        return sorted(self.model.speaker_map)

    @property
    def architecture(self) -> Architecture:
        return architecture(self.arch)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def list_voices(model: str) -> list[str]:
    """The voices of a checkpoint without loading the model: Qwen2.5 the keys of its spk_dict.pt, Qwen3 its config's
    talker_config.speaker_id (capitalised); [] for a text-only checkpoint."""
    path = resolve_model(model)
    cfg = model_config(path)
    if model_architecture(cfg).voices_in_config:
        return _config_voices(cfg)
    if not cfg.get("enable_audio_output", True):
        return []
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
    return SamplingParams(
        temperature=float(gc.temperature or 1.0),
        top_p=float(gc.top_p or 1.0),
        top_k=int(gc.top_k) if gc.top_k else -1,
        repetition_penalty=penalty,
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """The weights' dtype when none is asked for: bfloat16 on CUDA (the real weights' dtype), float32 elsewhere."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def load_model(
    model: str = "tiny",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    enable_audio_output: bool = True,
) -> LoadedModel:
    """Load model + processor, of the architecture the checkpoint's config names. dtype defaults to float32 on CPU and
    bfloat16 on CUDA (the real weights' dtype). A text-only checkpoint (`enable_audio_output: false`, as Qwen3-Omni's
    Thinking and Captioner releases) loads without its talker whatever `enable_audio_output` says."""
    from transformers import AutoProcessor

    path, cfg, arch = check_model(model)
    enable_audio_output = enable_audio_output and bool(cfg.get("enable_audio_output", True))
    device = device or default_device()
    dtype = getattr(torch, dtype or default_dtype(device)) if not isinstance(dtype, torch.dtype) else dtype
    record = architecture(arch)
    net = record.load("hf_model").from_pretrained(path, dtype=dtype, enable_audio_output=enable_audio_output)
    if record.talker_reads_thinker_audio_config and enable_audio_output:
        # transformers 5.23/5.24 gap: with audio in the prompt talker.get_rope_index reads
        # talker_config.audio_config.n_window, a sub-config the talker config never declares: it is the thinker's
        net.talker.config.audio_config = net.config.thinker_config.audio_config
    net = net.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return LoadedModel(name=model, path=path, model=net, processor=processor, arch=arch)
