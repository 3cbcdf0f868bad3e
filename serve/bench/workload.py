"""What `omni bench` sends: the media (drawn pictures, the bundled speech and clip), the questions, and request i of a
level as a ChatRequest for the in-process paths (serve/bench/http.py builds its HTTP body from the same parts)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np

from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart, VideoPart
from omni.assets import samples_dir

__all__ = ["INPUT_KINDS", "MODES", "QUESTIONS", "Media", "drawn_image", "tone", "load_media", "make_request"]

SAMPLES_DIR = samples_dir()  # bundled speech.wav, clip.mp4
INPUT_KINDS = ("text", "image", "audio", "video")  # what a request carries besides its question (text: nothing)
QUESTIONS = [
    "What do you see?",
    "Describe this in one sentence.",
    "What colours are there?",
    "Is anything moving?",
    "Tell me a short story about it.",
    "What shape is in the middle?",
    "Where could this be?",
    "Name three things.",
    "What would you call this picture?",
    "How does it make you feel?",
    "Count the objects.",
    "What is missing?",
    "Explain it to a child.",
    "Give it a title.",
    "What happens next?",
    "Say something nice about it.",
]


# ---------------------------------------------------------------------------------------------------- media, requests
@dataclass
class Media:
    image: object  # PIL.Image.Image
    audio: np.ndarray  # [n] float32 16 kHz
    video: Optional[object]  # omni.types.Video, or None when not asked for


def drawn_image(i: int, size: tuple[int, int] = (224, 168)):
    """A small drawn picture, different for each i."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        draw.ellipse((x, y, x + 40, y + 40), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def tone(seconds: float, hz: float, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * hz * t) * np.minimum(1, 20 * t)).astype(np.float32)  # [n], 50 ms fade-in


def load_media(with_video: bool) -> Media:
    """The bundled espeak-ng speech (else a tone) and, when asked, the bundled clip with its audio track."""
    from omni.encoders.media import MediaPolicy, load_audio, load_video

    policy = MediaPolicy(allowed_local_media_path=str(SAMPLES_DIR))
    speech = SAMPLES_DIR / "speech.wav"
    audio = load_audio(str(speech), policy) if speech.exists() else tone(3.0, 220.0)
    video = load_video(str(SAMPLES_DIR / "clip.mp4"), policy) if with_video else None
    return Media(drawn_image(0), audio, video)


MODES = ("text", "text+speech", "speech")  # chat text only, chat with speech, /v1/audio/speech (text read aloud)


def make_request(media: Media, i: int, speak, config) -> ChatRequest:
    """Request i of a level (distinct question per i), greedy Thinker and Talker with bounded tokens, a fresh id.
    speak: False (text), True (text+speech), or "speech": the speech endpoint's request reading question i aloud."""
    if speak == "speech":
        from omni.serve.api.convert import ConvertOptions, to_speech_request
        from omni.serve.api.protocol import SpeechRequest

        talker = {"temperature": 0.0, "max_tokens": config.speech_tokens}
        return to_speech_request(
            SpeechRequest(
                input=QUESTIONS[i % len(QUESTIONS)], response_format="pcm", sampling_params_list=[None, talker]
            ),
            uuid.uuid4().hex,
            ConvertOptions(default_speech_tokens=config.speech_tokens),
        )
    parts = {"image": ImagePart(media.image), "audio": AudioPart(media.audio), "video": VideoPart(media.video)}
    kind = config.inputs[i % len(config.inputs)]
    content = ([parts[kind]] if kind in parts else []) + [TextPart(QUESTIONS[i % len(QUESTIONS)])]
    return ChatRequest(
        [Message("user", content)],
        sampling=SamplingParams(max_tokens=config.max_tokens),
        talker_sampling=SamplingParams(max_tokens=config.speech_tokens),
        speak=speak,
        request_id=uuid.uuid4().hex,
    )
