"""The `omni` command: make-tiny, chat, speak, serve, caption, bench, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from omni.architectures import ARCHS
from omni.types import AUDIO_SAMPLE_RATE, DEFAULT_VOICE
from omni.serve.bench.cli import add_bench_parser

__all__ = ["main"]


def _cmd_make_tiny(args) -> int:
    from omni.architectures import ARCHITECTURES

    arch = ARCHITECTURES[args.arch]
    preset = f"{args.preset}{arch.tiny_suffix}"
    if args.text_only and not arch.text_only_checkpoints:
        able = ", ".join(a.name for a in ARCHITECTURES.values() if a.text_only_checkpoints)
        raise SystemExit(f"omni make-tiny: --text-only is for --arch {able} (its Thinking/Captioner shape)")
    kw = {"audio_output": False} if args.text_only else {}
    out = arch.load("build_tiny")(args.dir, preset=preset, seed=args.seed, **kw)
    print(f"wrote the {preset} checkpoint ({args.arch}{', text only' if args.text_only else ''}) to {out}")
    return 0


def _media_policy(paths):
    from omni.encoders.media import MediaPolicy

    # the CLI user's own files: allow the common parent of the paths given on the command line
    parents = [str(Path(p).resolve().parent) for p in paths]
    return MediaPolicy(allowed_local_media_path=os.path.commonpath(parents) if parents else None)


def build_chat_request(args):
    from dataclasses import replace

    from omni.types import (
        TALKER_DEFAULT_SAMPLING,
        AudioPart,
        ChatRequest,
        ImagePart,
        Message,
        SamplingParams,
        TextPart,
        VideoPart,
    )
    from omni.encoders.media import load_audio, load_image, load_video

    files = [p for p in (args.image or []) + (args.audio or []) + (args.video or [])]
    for f in files:
        if not Path(f).is_file():
            raise SystemExit(f"omni chat: no such file: {f}")
    policy = _media_policy(files)
    parts = [ImagePart(load_image(str(Path(p).resolve()), policy)) for p in args.image or []]
    parts += [AudioPart(load_audio(str(Path(p).resolve()), policy)) for p in args.audio or []]
    parts += [
        VideoPart(load_video(str(Path(p).resolve()), policy, with_audio=args.use_audio_in_video))
        for p in args.video or []
    ]
    parts.append(TextPart(args.prompt))
    messages = ([Message("system", args.system)] if args.system is not None else []) + [Message("user", parts)]
    # greedy unless --temperature or --seed is given (a seed alone samples at temperature 1)
    temperature = args.temperature if args.temperature is not None else (1.0 if args.seed is not None else 0.0)
    sampling = SamplingParams(
        temperature=temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed
    )
    sample_talker = args.talker_sample or args.seed is not None or temperature > 0
    talker = (
        replace(TALKER_DEFAULT_SAMPLING, max_tokens=args.max_speech_tokens, seed=args.seed)
        if sample_talker
        else SamplingParams(max_tokens=args.max_speech_tokens)
    )
    return ChatRequest(
        messages,
        sampling=sampling,
        talker_sampling=talker,
        speak=args.speak is not None,
        voice=args.voice,
        use_audio_in_video=args.use_audio_in_video,
    )


def _cmd_chat(args) -> int:
    import numpy as np

    from omni.types import AudioChunk, Finished, InvalidRequest, TextDelta
    from omni.serve.api.audio_io import wav_bytes
    from omni.serve.pipeline import Pipeline

    try:
        request = build_chat_request(args)  # bad media fails here, before the model is loaded
    except InvalidRequest as exc:
        print(f"omni chat: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    pipeline = Pipeline.from_pretrained(args.model, device=args.device)
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    async def go():
        pcm, fin, first = [], None, None
        t = time.time()
        async for ev in pipeline.stream(request):
            if isinstance(ev, TextDelta):
                first = first or time.time() - t
                print(ev.text, end="", flush=True)
            elif isinstance(ev, AudioChunk):
                pcm.append(ev.pcm)
            elif isinstance(ev, Finished):
                fin = ev
        print()
        return pcm, fin, first, time.time() - t

    try:
        pcm, fin, first, total = asyncio.run(go())
    except InvalidRequest as exc:
        print(f"omni chat: {exc}", file=sys.stderr)
        return 2
    msg = (
        f"[{fin.completion_tokens} tokens, finish_reason={fin.finish_reason}, first token "
        f"{(first or 0) * 1000:.0f} ms, total {total:.2f}s"
    )
    if args.speak is not None:
        wav = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
        Path(args.speak).parent.mkdir(parents=True, exist_ok=True)
        Path(args.speak).write_bytes(wav_bytes(wav))
        msg += f"; wrote {args.speak}: {len(wav) / AUDIO_SAMPLE_RATE:.2f}s of speech, {fin.codec_tokens} codec tokens"
    print(msg + "]", file=sys.stderr)
    return 0


def _cmd_speak(args) -> int:
    """The speech endpoint's path in process: the reply forced to TEXT, spoken, written in the --out extension's
    format (wav, pcm, mp3, opus, flac, aac)."""
    from omni.types import InvalidRequest
    from omni.serve.api.audio_io import AUDIO_FORMATS, encode_audio
    from omni.serve.api.convert import ConvertOptions, to_speech_request
    from omni.serve.api.protocol import SpeechRequest
    from omni.serve.pipeline import Pipeline

    out = Path(args.out)
    fmt = out.suffix.lstrip(".").lower()
    fmt = {"ogg": "opus", "raw": "pcm"}.get(fmt, fmt)
    if fmt not in AUDIO_FORMATS:
        print(f"omni speak: unsupported output {out.name}: use one of .{', .'.join(AUDIO_FORMATS)}", file=sys.stderr)
        return 2
    sampling = [None, {"max_tokens": args.max_speech_tokens, **({"temperature": 0.0} if args.seed is None else {})}]
    try:
        req = SpeechRequest(
            input=args.text,
            voice=args.voice,
            response_format=fmt,
            instructions=args.instructions,
            seed=args.seed,
            sampling_params_list=sampling,
        )
    except ValueError as exc:
        print(f"omni speak: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    pipeline = Pipeline.from_pretrained(args.model, device=args.device)
    try:
        chat = to_speech_request(
            req, "speak", ConvertOptions(voices=tuple(pipeline.voices), default_speech_tokens=args.max_speech_tokens)
        )
        result = asyncio.run(pipeline.run(chat))
    except InvalidRequest as exc:
        print(f"omni speak: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_audio(result.waveform, fmt))
    print(
        f"wrote {out}: {len(result.waveform) / AUDIO_SAMPLE_RATE:.2f}s of speech ({len(result.codec_ids)} codec "
        f"tokens, voice {chat.voice}) in {time.time() - t0:.1f}s",
        file=sys.stderr,
    )
    return 0


def _cmd_serve(args) -> int:
    from omni.serve.cluster.builder import run_server

    return run_server(args)


DEMO_MODULE = "omni.demos.gradio_app"  # run, never imported: nothing imports demos (DESIGN.md, "Layout")


def _cmd_demo(args) -> int:
    """`omni demo`: this process becomes `python -m omni.demos.gradio_app ...` (exec: same pid, so SIGTERM/SIGINT
    reach the demo, which stops its child server)."""
    import importlib.util

    for need in ("gradio", "openai"):
        if importlib.util.find_spec(need) is None:
            print(f"omni demo: {need} is missing: pip install 'omni[demo]' (make setup installs it)", file=sys.stderr)
            return 2
    argv = [sys.executable, "-m", DEMO_MODULE, "--host", args.host, "--port", str(args.port)]
    argv += ["--api-url", args.api_url] if args.api_url else []
    argv += ["--api-key", args.api_key] if args.api_key else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def _resources(text):
    """--encoder-resources / --thinker-resources: NAME=QTY[,NAME=QTY...] -> {NAME: QTY}."""
    out = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, _, qty = item.partition("=")
        try:
            out[name.strip()] = float(qty) if qty else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=QUANTITY, got {item!r}") from None
    return out


def _cmd_caption(args) -> int:
    from omni.serve.caption_io import CaptionError

    try:
        from omni.serve.cluster.caption import CaptionOptions, run_caption

        opts = CaptionOptions(
            model=args.model,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            use_audio_in_video=args.use_audio_in_video,
            speak_dir=args.speak,
            voice=args.voice,
            max_speech_tokens=args.max_speech_tokens,
            device=args.device,
            gpus_per_actor=0.5 if args.device.startswith("cuda") else 0.0,
            encoder_resources=args.encoder_resources,
            thinker_resources=args.thinker_resources,
        )
        report = run_caption(args.inputs, args.out, opts, resume=args.resume, retry_errors=args.retry_errors)
    except CaptionError as exc:
        print(f"omni caption: {exc}", file=sys.stderr)
        return 2
    if report.interrupted:
        return 128 + report.interrupted  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    if report.files and not report.ok:
        print(
            f"omni caption: none of the {report.files} files could be captioned (see the error column of {args.out})",
            file=sys.stderr,
        )
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="omni", description="Serve Qwen omni models: text, images, audio, video in; text and speech out, streamed."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-tiny", help="write the tiny random checkpoint (model, processor, speakers)")
    p.add_argument("dir")
    p.add_argument("--arch", default=ARCHS[0], choices=ARCHS)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument(
        "--text-only",
        action="store_true",
        help="qwen3-omni without talker and code2wav (like the Thinking and Captioner releases)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("chat", help="one request in process (no Ray), text streamed to the terminal")
    p.add_argument("prompt")
    p.add_argument(
        "--model", default="tiny", help="tiny | small | tiny-qwen3 | small-qwen3 | a checkpoint directory | a hub id"
    )
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument("--audio", action="append", help="audio file (repeatable)")
    p.add_argument("--video", action="append", help="video file (repeatable)")
    p.add_argument("--use-audio-in-video", action="store_true", help="feed each video's audio track too")
    p.add_argument("--system", default=None, help="system prompt (default: Qwen's, which speech output needs)")
    p.add_argument("--voice", default=DEFAULT_VOICE)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-speech-tokens", type=int, default=1024, help="codec tokens at most (50 per second)")
    p.add_argument("--speak", metavar="OUT.wav", default=None, help="also synthesize speech into this WAV file")
    p.add_argument("--temperature", type=float, default=None, help="default: greedy (0), or 1 with --seed")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--talker-sample",
        action="store_true",
        help="sample speech tokens with the checkpoint's defaults (T 0.9, top-k 40, top-p 0.8); "
        "implied by --temperature > 0 or --seed",
    )
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("speak", help="the model reads TEXT aloud (the speech endpoint's path, in process)")
    p.add_argument("text")
    p.add_argument("--model", default="tiny", help="tiny | small | a checkpoint directory | a hub id")
    p.add_argument("--voice", default=DEFAULT_VOICE)
    p.add_argument("--out", default="speech.wav", help="F.wav|.mp3|.opus|.flac|.aac|.pcm (format from the extension)")
    p.add_argument("--instructions", default=None, help="how to speak (goes into the conversation)")
    p.add_argument("--max-speech-tokens", type=int, default=1024, help="codec tokens at most (50 per second)")
    p.add_argument("--seed", type=int, default=None, help="sample the Talker with this seed (default: greedy)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_speak)

    p = sub.add_parser("serve", help="start Ray and the OpenAI-compatible Serve app; blocks")
    p.add_argument("--model", default="tiny")
    p.add_argument("--config", default=None, help="configs/serve/<name>.yaml (default: tiny.yaml on CPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"))
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="local paths and file:// media URLs are read only inside this directory (default: refused)",
    )
    p.add_argument(
        "--allow-http-media",
        action="store_true",
        help="fetch http(s) media URLs (size- and time-limited; never loopback/private/link-local targets)",
    )
    p.add_argument(
        "--api-dialect",
        default="openai",
        choices=["openai", "vllm-omni"],
        help="response shapes: OpenAI's (default) or vllm-omni's, so its example clients work unchanged",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may finish (default: the config's, 30)",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("caption", help="caption files, folders or @lists of media into JSONL/Parquet (Ray Data job)")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="a file, a folder (recursed) or @list.txt (a path a line)"
    )
    p.add_argument("--out", required=True, metavar="FILE.jsonl|FILE.parquet")
    p.add_argument("--prompt", default=None, help="default: one per media type (\"Describe this image in one ...\")")
    p.add_argument("--model", default="tiny", help="tiny | small | a checkpoint directory | a hub id")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--resume", action="store_true", help="skip files already in --out and append")
    p.add_argument("--retry-errors", action="store_true", help="with --resume: redo the files that failed")
    p.add_argument("--batch-size", type=int, default=8, help="files per encoder / Thinker call")
    p.add_argument("--concurrency", type=int, default=1, help="actors per model stage (encoders, Thinker)")
    p.add_argument("--use-audio-in-video", action="store_true", help="feed each video's audio track too")
    p.add_argument("--speak", metavar="DIR", default=None, help="also write DIR/<relative path>.wav (24 kHz)")
    p.add_argument("--voice", default="Chelsie")
    p.add_argument("--max-speech-tokens", type=int, default=1024, help="codec tokens per file (50 per second)")
    p.add_argument("--device", default="cpu", help="the model stages' device (cuda: 0.5 GPU per actor)")
    p.add_argument(
        "--encoder-resources",
        type=_resources,
        default={},
        metavar="NAME=QTY,...",
        help="custom Ray resources per encoder actor (pins them to nodes that have them)",
    )
    p.add_argument(
        "--thinker-resources",
        type=_resources,
        default={},
        metavar="NAME=QTY,...",
        help="custom Ray resources per Thinker actor",
    )
    p.set_defaults(func=_cmd_caption)

    add_bench_parser(sub)

    p = sub.add_parser("demo", help="the Gradio web demo (voice and vision chat) against an omni server")
    p.add_argument(
        "--api-url",
        default=None,
        help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 "
        "(default: start omni serve --model tiny as a child process)",
    )
    p.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=_cmd_demo)
    return ap


def _models_to_load(args) -> list[str]:
    """The models a command will load in this process or the cluster it starts: none for make-tiny and demo (its
    own server is the tiny default), none for a benchmark of a running server (--url: the model is the server's)."""
    if args.cmd == "bench":
        if getattr(args, "url", None):
            return []
        return [m.strip() for m in (args.model or "").split(",") if m.strip()]
    model = getattr(args, "model", None)
    return [model] if model else []


def check_start(args) -> int:
    """Fail at start, in one line and with exit code 2, when transformers is outside the supported versions or a
    model cannot be loaded (no such directory, no config.json, a hub id while the hub is offline or unreachable,
    not a Qwen-Omni checkpoint): before Ray starts or anything is loaded. 0 when all is well."""
    from omni.checkpoint import ModelLoadError, VersionError, check_model, check_versions

    try:
        check_versions()
        for model in _models_to_load(args):
            check_model(model)
    except (VersionError, ModelLoadError) as exc:
        print(f"omni: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers warns about the tiny checkpoint's unused default sub-config ids and a video-processor default that
    # omni's own frame sampling already handles: noise for a terminal user
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parser().parse_args(argv)
    return check_start(args) or args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
