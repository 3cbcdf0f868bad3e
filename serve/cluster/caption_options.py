"""`omni caption`'s options: what the job's driver (serve/cluster/caption.py) and its Ray Data stages
(serve/cluster/caption_stages.py) both read. The stages' own settings (context, the Thinker's running batch, the
Talker and vocoder) are a serving `PipelineConfig`, the defaults written once in serve/config.py. No ray import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omni.checkpoint import default_dtype
from omni.types import DEFAULT_VOICE
from omni.serve.caption_io import CaptionError
from omni.serve.config import PipelineConfig

__all__ = ["CaptionOptions"]


@dataclass(frozen=True)
class CaptionOptions:
    model: str = "tiny"  # preset (tiny, small), checkpoint directory or hub id
    prompt: Optional[str] = None  # one prompt for every file; None: DEFAULT_PROMPTS by media type
    max_tokens: int = 128  # caption tokens at most (greedy, as `omni chat`)
    batch_size: int = 8  # files per call of an encoder or Thinker actor
    concurrency: int = 1  # actors per model stage: the encoder pool and the Thinker pool each get this many
    use_audio_in_video: bool = False  # a video's own audio track goes in with its frames
    speak_dir: Optional[str] = None  # write <speak_dir>/<relative path>.wav (24 kHz) through the Talker + vocoder
    voice: str = DEFAULT_VOICE  # speaker for --speak
    max_speech_tokens: int = 1024  # codec tokens per file at most with --speak (50 per second)
    device: str = "cpu"  # the model stages' torch device ("cuda" on GPU nodes)
    decode_tasks: Optional[int] = None  # read/decode tasks at once; None: half the cluster's CPUs (1 on 2 cores: each
    #                                     task is a process with torch and the processor loaded)
    decode_cpus: float = 0.25  # Ray CPUs per decode task (fractional: 2-core machines)
    encoder_cpus: float = 0.25  # Ray CPUs per encoder actor
    thinker_cpus: float = 0.5  # Ray CPUs per Thinker actor
    gpus_per_actor: float = 0.0  # Ray GPUs per encoder / Thinker actor (0.5 each: both stages on one GPU)
    thinker_threads: Optional[int] = None  # torch threads of a Thinker actor on CPU; None: max(1, cores // 2)
    thinker_calls: int = 4  # batches one Thinker actor runs at once: its engine keeps rows of several batches
    worker_niceness: Optional[int] = 0  # nice of the job's Ray workers; None keeps Ray's 15, which lets every other
    #                                      process on a shared machine starve them (the driver runs at 0)
    encoder_resources: dict = field(default_factory=dict)  # custom Ray resources per encoder actor ({"enc": 1})
    thinker_resources: dict = field(default_factory=dict)  # custom Ray resources per Thinker actor
    config: PipelineConfig = field(default_factory=PipelineConfig)  # the stages: max_model_len, the Thinker's running
    #                                                                 batch (thinker.max_num_seqs), Talker, vocoder

    def __post_init__(self):
        if self.max_tokens < 1 or self.batch_size < 1 or self.concurrency < 1 or (self.decode_tasks or 1) < 1:
            raise CaptionError("--max-tokens, --batch-size, --concurrency and decode_tasks must be >= 1")

    @property
    def dtype(self) -> str:
        return default_dtype(self.device)
