"""The web demo: a voice-and-vision chat with an omni server, streamed (`omni demo`, or `python demos/gradio_app.py`).

It is a client of the public API only, through the official OpenAI SDK: `GET /v1/models` (the model), `GET
/v1/audio/voices` (the voice dropdown) and streaming `POST /v1/chat/completions` with `modalities=["text","audio"]`,
`audio={"voice": V, "format": "pcm16"}`. Each turn sends the whole conversation again (earlier turns' media, text
and the model's replies). Text deltas stream into the chat; audio deltas (base64 PCM16, mono, 24 kHz) are passed on
as they come to a streaming audio player, so speech starts while the answer is still being written, and each reply's
whole WAV stays in the history. Stop cancels the request (closing the SDK stream closes the connection, and the
server cancels it in every stage); errors (a 4xx/5xx body, an error inside the stream, a server that is down) show
as a message in the chat.

Live voice (demos/live_voice.py, live_voice.js): beside the chat, the browser microphone streams to `/v1/realtime`
over a WebSocket (OpenAI's Realtime API; the server's VAD takes the turns; speaking during the reply interrupts it);
this side mints the page a short-lived client secret (`POST /v1/realtime/client_secrets`), so the key stays here.

Without `--api-url`, `omni demo` starts `omni serve` on the tiny default as a child process, stopped on exit.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import openai

from omni.prompt import DEFAULT_SYSTEM_PROMPT
from omni.demos.live_voice import LIVE_HEAD, live_section, mint_session
from omni.serve.api.audio_io import wav_header

__all__ = ["DemoSettings", "Turn", "build_demo", "launch_demo", "chat_messages", "describe_error", "run_demo", "main"]

SAMPLE_RATE = 24000  # the API's streamed speech: PCM16 little-endian, mono, 24 kHz
DEFAULT_VOICE = "Chelsie"
UI_UPDATE_S = 0.05  # text deltas are coalesced into one page update per this many seconds (audio goes out at once)
STOPPED = "⏹ stopped"


@dataclass(frozen=True)
class DemoSettings:
    api_url: str  # the OpenAI SDK's base_url, e.g. http://127.0.0.1:8000/v1
    api_key: str = "unused"  # sent as `Authorization: Bearer`; any string for a server without --api-key
    model: Optional[str] = None  # the model requests name; None: the first one /v1/models lists
    timeout_s: float = 600.0  # per request (a long spoken answer streams for a while)
    max_tokens_limit: int = 4096  # the max-tokens slider's right end
    out_dir: Optional[str] = None  # where replies' WAVs are written (and served from); None: a new temporary one


@dataclass
class Turn:
    """One user message and the model's reply, filled in while it streams (a per-stream object, kept in gr.State)."""

    text: str
    image: Optional[str] = None  # local paths of this turn's uploads (Gradio's cache)
    audio: Optional[str] = None
    video: Optional[str] = None
    reply: str = ""  # the text received so far
    pcm: bytearray = field(default_factory=bytearray)  # the speech received so far: PCM16 LE, mono, 24 kHz
    wav: Optional[str] = None  # the whole reply's speech as a WAV file, once the reply has ended
    error: Optional[str] = None  # a readable message when the request failed (the turn is not sent again)
    played: int = 0  # bytes of pcm handed to the streaming player
    stopped: bool = False  # Stop was pressed while it streamed
    done: bool = False

    def take_unplayed(self) -> Optional[bytes]:
        """The speech that came since the last call, as one WAV for the streaming player (None: nothing new)."""
        if len(self.pcm) == self.played:
            return None
        pcm, self.played = bytes(self.pcm[self.played :]), len(self.pcm)
        return wav_header(len(pcm), SAMPLE_RATE) + pcm

    def finish(self, out_dir: Path) -> None:
        """Ends the reply (once): writes what speech came as a WAV."""
        if self.done:
            return
        self.done = True
        if self.pcm:
            path = out_dir / f"reply-{uuid.uuid4().hex[:12]}.wav"
            path.write_bytes(wav_header(len(self.pcm), SAMPLE_RATE) + bytes(self.pcm))
            self.wav = str(path)


# ------------------------------------------------------------------------------------------------ requests
def _data_uri(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _user_content(turn: Turn) -> list[dict[str, Any]]:
    """A turn's media and text as OpenAI content parts (media as base64 / data: URIs)."""
    parts: list[dict[str, Any]] = []
    if turn.image:
        parts.append({"type": "image_url", "image_url": {"url": _data_uri(turn.image)}})
    if turn.audio:
        ext = Path(turn.audio).suffix.lower().lstrip(".")
        if ext in ("wav", "mp3"):  # OpenAI's input_audio formats; anything else goes as a data: URI
            data = base64.b64encode(Path(turn.audio).read_bytes()).decode()
            parts.append({"type": "input_audio", "input_audio": {"data": data, "format": ext}})
        else:
            parts.append({"type": "audio_url", "audio_url": {"url": _data_uri(turn.audio)}})
    if turn.video:
        parts.append({"type": "video_url", "video_url": {"url": _data_uri(turn.video)}})
    if turn.text:
        parts.append({"type": "text", "text": turn.text})
    return parts


def chat_messages(turns: list[Turn], system: str) -> list[dict[str, Any]]:
    """The conversation to send: the system prompt, then every turn that did not fail (user content, the reply
    so far as the assistant's text); the last turn is the new question."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system.strip() else []
    ok = [t for t in turns if t.error is None]
    for i, t in enumerate(ok):
        messages.append({"role": "user", "content": _user_content(t)})
        if i < len(ok) - 1:
            messages.append({"role": "assistant", "content": t.reply})
    return messages


def describe_error(exc: BaseException, api_url: str) -> str:
    """An exception from the SDK (or from reading an upload) -> one readable line for the page."""
    if isinstance(exc, openai.APITimeoutError):
        return f"⚠️ The server at {api_url} did not answer in time."
    if isinstance(exc, openai.APIConnectionError):
        return f"⚠️ Cannot reach the server at {api_url}: is `omni serve` running? ({exc.__cause__ or exc})"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        body = body.get("error", body) if isinstance(body.get("error"), dict) else body
        message = body.get("message") or exc.response.text[:500] or str(exc)
        title = {
            400: "The server refused the request",
            401: "The API key was refused",
            404: "Not found",
            413: "Too large for the server",
            503: "The server is busy: try again in a moment",
        }.get(exc.status_code, "Server error")
        return f"⚠️ {title} (HTTP {exc.status_code}): {message}"
    if isinstance(exc, openai.APIError):  # an error event inside the stream, after the answer had started
        return f"⚠️ The answer failed on the server: {exc.message}"
    if isinstance(exc, OSError):
        return f"⚠️ Could not read an upload: {exc}"
    return f"⚠️ {type(exc).__name__}: {exc}"


async def _read(stream, turn: Turn, changed: asyncio.Event) -> None:
    """Reads a chat-completion stream into `turn` (text deltas, then decoded audio deltas), setting `changed`."""
    async for chunk in stream:
        for choice in chunk.choices:
            turn.reply += choice.delta.content or ""
            # delta.audio = {id, data: base64 PCM16, transcript}, declared or not by this SDK version
            data = (choice.delta.model_dump().get("audio") or {}).get("data")
            if data:
                turn.pcm += base64.b64decode(data)
        changed.set()


# ------------------------------------------------------------------------------------------------ the page
def _file(path: str) -> dict[str, Any]:
    """A file in a chat message (Gradio picks the player by its MIME type)."""
    return {"path": path, "mime_type": mimetypes.guess_type(path)[0]}


def _render(turns: list[Turn]) -> list[dict[str, Any]]:
    """Turns -> gr.Chatbot messages: user text and media; the reply's text (or error), then its WAV (replay,
    download). Files go as file messages, not components: a page update re-renders the whole history."""
    out: list[dict[str, Any]] = []
    for t in turns:
        user: list[Any] = [t.text] if t.text else []
        user += [_file(p) for p in (t.image, t.audio, t.video) if p]
        out.append({"role": "user", "content": user})
        text = t.reply + (f"\n\n{STOPPED}" if t.stopped else "")
        if t.error:
            text = (text + "\n\n" if text else "") + t.error
        reply: list[Any] = [text] if text else []
        if t.wav:  # a native player (replay) and a link (download), apart from the model's text
            url = "gradio_api/file=" + quote(t.wav)  # served by Gradio from the demo's out_dir (allowed_paths)
            reply.append(
                f'<audio controls preload="metadata" src="{url}"></audio>\n\n'
                f'<a href="{url}" download="{Path(t.wav).name}">download the speech (WAV)</a>'
            )
        if reply:
            out.append({"role": "assistant", "content": reply})
    return out


def build_demo(settings: DemoSettings):
    """-> gr.Blocks (not launched). Element ids (for tests and CSS): chat, speech, prompt, send, stop, clear,
    image, audio, video, voice, speak, audio-in-video, system, temperature, max-tokens, status; the live voice
    mode's live-start, live-stop, live-state, live-log (demos/live_voice.py)."""
    import gradio as gr

    client = openai.AsyncOpenAI(
        base_url=settings.api_url, api_key=settings.api_key, timeout=settings.timeout_s, max_retries=0
    )
    out_dir = Path(settings.out_dir or tempfile.mkdtemp(prefix="omni-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    server = {"model": settings.model}  # filled on page load

    async def connect():
        """Page load: the model's name and voices from the server."""
        try:
            if server["model"] is None:
                server["model"] = (await client.models.list()).data[0].id
            voices = (await client.get("/audio/voices", cast_to=object))["voices"]
        except Exception as e:  # noqa: BLE001 - shown on the page
            return (
                f"{describe_error(e, settings.api_url)} Reload the page once the server is up.",
                gr.update(),
                gr.update(),
            )
        status = f"Connected to {settings.api_url}: model `{server['model']}`, voices {', '.join(voices) or 'none'}."
        value = DEFAULT_VOICE if DEFAULT_VOICE in voices else (voices[0] if voices else None)
        return (status, gr.update(choices=voices, value=value), gr.update(value=bool(voices), interactive=bool(voices)))

    idle = (gr.update(interactive=True), gr.update(interactive=False))  # send, stop
    busy = (gr.update(interactive=False), gr.update(interactive=True))

    async def respond(text, image, audio, video, turns, voice, speak, audio_in_video, system, temperature, max_tokens):
        """One turn. Yields (chat, speech chunk, turns, prompt, image, audio, video, send, stop)."""
        turns = list(turns or [])
        text = (text or "").strip()
        if not (text or image or audio or video):
            gr.Warning("Type a question, or add an image, audio or video first.")
            return
        turn = Turn(text, image, audio, video)
        turns.append(turn)
        keep = gr.skip()
        yield _render(turns), None, turns, "", None, None, None, *busy
        stream = reader = None
        try:
            if server["model"] is None:
                server["model"] = (await client.models.list()).data[0].id
            extra: dict[str, Any] = {}
            if audio_in_video and any(t.video for t in turns):
                extra["mm_processor_kwargs"] = {"use_audio_in_video": True}
            speech = (
                {"modalities": ["text", "audio"], "audio": {"voice": voice or DEFAULT_VOICE, "format": "pcm16"}}
                if speak
                else {}
            )
            stream = await client.chat.completions.create(
                model=server["model"],
                messages=chat_messages(turns, system or ""),
                stream=True,
                max_tokens=int(max_tokens),
                temperature=float(temperature),
                extra_body=extra or None,
                **speech,
            )
            # the stream is read as fast as it comes, apart from the page updates (each one a snapshot)
            reader = asyncio.create_task(_read(stream, turn, changed := asyncio.Event()))
            while not (reader.done() or turn.stopped):
                waiter = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait([reader, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                changed.clear()
                yield _render(turns), turn.take_unplayed(), turns, *(keep,) * 4, *busy
                await asyncio.sleep(UI_UPDATE_S)
            if reader.done():
                reader.result()  # its error, if any
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the chat
            turn.error = describe_error(e, settings.api_url)
        finally:  # also on Stop or Clear (Gradio cancels this task): closing the stream cancels the request
            if reader is not None:
                reader.cancel()
            if stream is not None:
                await stream.close()
        turn.finish(out_dir)
        yield _render(turns), None, turns, *(keep,) * 4, *idle

    async def mint(voice_value, system_value):
        """Live voice: a client secret for the page's WebSocket (the API key stays here)."""
        if server["model"] is None:
            server["model"] = (await client.models.list()).data[0].id
        return await mint_session(client, settings.api_url, server["model"], voice_value, system_value)

    def stop(turns):
        """Stop: the running reply (cancelled by Gradio) keeps what it had, marked stopped, with its speech."""
        turns = list(turns or [])
        if turns and not turns[-1].done:
            turns[-1].stopped = True
            turns[-1].finish(out_dir)
        return _render(turns), None, turns, *idle  # None: the live player stops too

    with gr.Blocks(title="omni demo") as demo:
        gr.Markdown(
            "## omni: voice and vision chat\nAsk about an image, a recording or a video; the answer is "
            "written and spoken as it streams."
        )
        status = gr.Markdown("Connecting to the server ...", elem_id="status")
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", height=520, label="Chat", buttons=["copy"])
                speech = gr.Audio(
                    label="Speech (plays while the answer streams)",
                    elem_id="speech",
                    streaming=True,
                    autoplay=True,
                    interactive=False,
                )
                with gr.Row():
                    prompt = gr.Textbox(
                        placeholder="Ask something, then press Enter",
                        show_label=False,
                        scale=5,
                        elem_id="prompt",
                        lines=1,
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
                    stop_btn = gr.Button(
                        "Stop", variant="stop", elem_id="stop", interactive=False, scale=1, min_width=80
                    )
                    clear = gr.Button("Clear", elem_id="clear", scale=1, min_width=80)
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(
                        type="filepath",
                        sources=["upload", "webcam", "clipboard"],
                        label="Image",
                        elem_id="image",
                        height=200,
                    )
                    video = gr.Video(
                        sources=["upload", "webcam"], include_audio=True, label="Video", elem_id="video", height=200
                    )
                audio = gr.Audio(type="filepath", sources=["upload", "microphone"], label="Audio", elem_id="audio")
                with gr.Accordion("Settings", open=True):
                    voice = gr.Dropdown(
                        choices=[DEFAULT_VOICE],
                        value=DEFAULT_VOICE,
                        label="Voice",
                        allow_custom_value=True,
                        elem_id="voice",
                    )
                    with gr.Row():
                        speak = gr.Checkbox(value=True, label="Speech", elem_id="speak")
                        audio_in_video = gr.Checkbox(value=False, label="Use audio in video", elem_id="audio-in-video")
                    system = gr.Textbox(value=DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3, elem_id="system")
                    temperature = gr.Slider(
                        0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature"
                    )
                    max_tokens = gr.Slider(
                        1, settings.max_tokens_limit, value=256, step=1, label="Max tokens", elem_id="max-tokens"
                    )

        live_section(gr, mint, voice, system, lambda e: describe_error(e, settings.api_url))  # demos/live_voice.py

        inputs = [prompt, image, audio, video, turns, voice, speak, audio_in_video, system, temperature, max_tokens]
        outputs = [chat, speech, turns, prompt, image, audio, video, send, stop_btn]
        runs = [send.click(respond, inputs, outputs), prompt.submit(respond, inputs, outputs)]
        stop_btn.click(stop, [turns], [chat, speech, turns, send, stop_btn], cancels=runs)
        clear.click(lambda: ([], None, [], *idle), None, [chat, speech, turns, send, stop_btn], cancels=runs)
        chat.clear(lambda: (None, [], *idle), None, [speech, turns, send, stop_btn], cancels=runs)  # its trash icon
        demo.load(connect, None, [status, voice, speak])
    return demo


def launch_demo(settings: DemoSettings, host: str = "127.0.0.1", port: int = 7860):
    """Builds the page and serves it on host:port in the background (the caller blocks or closes it). -> gr.Blocks"""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing phones home
    out_dir = settings.out_dir or tempfile.mkdtemp(prefix="omni-demo-")
    demo = build_demo(replace(settings, out_dir=out_dir))
    demo.queue(default_concurrency_limit=16).launch(  # 16 sessions answer at once; the server admits or says 503
        server_name=host,
        server_port=port,
        ssr_mode=False,
        quiet=True,
        prevent_thread_lock=True,
        allowed_paths=[out_dir],  # the replies' WAVs, which the chat's players load
        head=LIVE_HEAD,
    )  # the live voice mode's script (demos/live_voice.js)
    return demo


# ------------------------------------------------------------------------------------------------ launching
READY_LINE = "omni demo is ready: "  # printed (stderr) once the page is served


def _interrupt(signum, frame):
    """SIGTERM ends the page as Ctrl-C does, so that the child server is stopped too."""
    raise KeyboardInterrupt


def run_demo(
    api_url: Optional[str] = None, api_key: Optional[str] = None, host: str = "127.0.0.1", port: int = 7860
) -> int:
    """`omni demo`: the page on host:port against api_url, or against a child `omni serve --model tiny`; blocks
    until Ctrl-C / SIGTERM, then stops the child."""
    child = None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if api_url is None:
            from omni.serve.cluster.process import ServeProcess

            child = ServeProcess(["--model", "tiny", *(["--api-key", api_key] if api_key else [])])
            print(
                f"starting omni serve --model tiny on {child.url} (log: {child.log_path}) ...",
                file=sys.stderr,
                flush=True,
            )
            child.start()
            api_url = child.api_url
            print(f"omni serve is ready: {api_url}", file=sys.stderr, flush=True)
        demo = launch_demo(DemoSettings(api_url=api_url.rstrip("/"), api_key=api_key or "unused"), host, port)
        print(f"the demo talks to {api_url}", file=sys.stderr, flush=True)
        print(f"{READY_LINE}http://{host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    except (RuntimeError, OSError) as e:  # the child server did not start; the port is taken
        print(f"omni demo: {e}", file=sys.stderr)
        return 1
    finally:
        if child is not None:
            print("stopping omni serve ...", file=sys.stderr, flush=True)
            child.stop()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m omni.demos.gradio_app [--api-url URL] ...`: what `omni demo ...` runs (the flags are the same)."""
    import argparse

    ap = argparse.ArgumentParser(prog="omni demo", description="the Gradio web demo against an omni server")
    ap.add_argument(
        "--api-url",
        default=None,
        help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 "
        "(default: start omni serve --model tiny as a child process)",
    )
    ap.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)
    return run_demo(args.api_url, args.api_key, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
