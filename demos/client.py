"""A command-line client of `omni serve` with the official OpenAI SDK: streams the answer's text to the terminal and
writes its speech (streamed base64 PCM16, mono, 24 kHz) to a WAV.

    python demos/client.py --image assets/samples/image.png --audio assets/samples/speech.wav \\
        --out answer.wav "What do you see and hear?"

Exit status: 0; 1 with the server's error message on stderr; 2 for bad arguments (a missing file).
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
import time
import wave
from pathlib import Path

import openai

__all__ = ["main"]

SAMPLE_RATE = 24000  # the API's streamed speech: PCM16 little-endian, mono, 24 kHz


def _data_uri(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("--api-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    ap.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY", "unused"))
    ap.add_argument("--model", default=None, help="default: the first model the server lists")
    ap.add_argument("--image", help="an image file")
    ap.add_argument("--audio", help="an audio file (wav, mp3, flac, ...)")
    ap.add_argument("--video", help="a video file")
    ap.add_argument("--voice", default="Chelsie")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="answer.wav", help="the speech as a WAV; '-' for text only")
    args = ap.parse_args(argv)
    for f in (args.image, args.audio, args.video):
        if f and not Path(f).is_file():
            ap.error(f"no such file: {f}")

    client = openai.OpenAI(base_url=args.api_url, api_key=args.api_key, max_retries=0)
    content = [{"type": "image_url", "image_url": {"url": _data_uri(args.image)}}] if args.image else []
    content += [{"type": "audio_url", "audio_url": {"url": _data_uri(args.audio)}}] if args.audio else []
    content += [{"type": "video_url", "video_url": {"url": _data_uri(args.video)}}] if args.video else []
    content.append({"type": "text", "text": args.prompt})
    speak = args.out != "-"
    pcm, t0, first_text, first_audio = bytearray(), time.perf_counter(), None, None
    try:
        model = args.model or client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model,
            stream=True,
            max_tokens=args.max_tokens,
            messages=[{"role": "user", "content": content}],
            **({"modalities": ["text", "audio"], "audio": {"voice": args.voice, "format": "pcm16"}} if speak else {}),
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    first_text = first_text or time.perf_counter() - t0
                    print(choice.delta.content, end="", flush=True)
                audio = choice.delta.model_dump().get("audio") or {}  # {id, data: base64 PCM16, transcript}
                if audio.get("data"):
                    first_audio = first_audio or time.perf_counter() - t0
                    pcm += base64.b64decode(audio["data"])
    except openai.APIStatusError as e:
        print(f"\nclient.py: the server answered {e.status_code}: {e.message}", file=sys.stderr)
        return 1
    except openai.APIError as e:  # connection errors, and errors inside the stream
        print(f"\nclient.py: {e.message} ({args.api_url})", file=sys.stderr)
        return 1
    print()
    took = time.perf_counter() - t0
    report = f"[first text {first_text or 0:.2f} s, total {took:.2f} s"
    if speak:
        with wave.open(args.out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(bytes(pcm))
        report += f"; first audio {first_audio or 0:.2f} s; wrote {args.out}: {len(pcm) // 2 / SAMPLE_RATE:.2f} s"
    print(report + "]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
