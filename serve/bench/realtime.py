"""`omni bench realtime`: does a conversation's later turn answer as fast as its first? A spoken conversation of
`turns` questions, time to first audio (TTFA) per turn, through `/v1/realtime` and as chat completions, side by side.

    omni bench realtime --model tiny --turns 5 --repeats 3 --sessions 1,4,16

The bench serves the model itself: the HTTP app (serve/api/server.py, which mounts /v1/realtime) over the in-process
pipeline on uvicorn, on a free local port; each reply is bounded (`--max-tokens` text tokens, `--speech-tokens` codec
tokens) so a turn measures the way to the first audio, not a long reply. The clients are the official SDK's:
- realtime: one session (`client.realtime.connect`), manual turns (`turn_detection: null`): per turn, the question's
  PCM16 24 kHz appended in 100 ms chunks and committed; the clock starts at `response.create`, sent once the server
  has answered `input_audio_buffer.committed`, and stops at the first `response.output_audio.delta`. (With server VAD
  a turn also waits `silence_duration_ms` for the end of speech: the same for both paths, left out here.)
- chat: the same conversation as chat completions, each turn resending every earlier turn (the questions as base64
  WAV `input_audio`, the realtime session's replies as assistant text), streamed with audio; the clock runs from the
  request to the first `delta.audio`. Twice: with the encoder cache (serve/encoder_cache.py, the default) and without
  it (what each turn cost before the cache: every earlier question encoded again).
Each path starts with an empty encoder cache; per turn the median over `repeats` conversations. Then, per session
count in `--sessions`, the turn latency of N sessions talking at once against the chat path's TTFAP, with the
goal check (serve/bench/realtime_sessions.py). Writes `<out>/realtime.json` and prints Markdown tables. On a CPU,
read the ratios, not the absolute times.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omni.serve.bench.results import save_and_print

__all__ = ["RealtimeBenchConfig", "PATHS", "spoken_questions", "run_realtime_bench", "markdown", "main"]

RATE = 24000  # the Realtime API's audio/pcm rate
CHUNK = RATE // 10  # samples per input_audio_buffer.append: 100 ms
EVENT_TIMEOUT_S = 300.0  # the longest wait for the server's next event before the bench gives up
PATHS = ("realtime", "chat", "chat_no_cache")  # the measured paths, in the table's order
QUESTIONS = (
    "What is the capital of France?",
    "And how many people live there?",
    "What is it famous for?",
    "Which river runs through it?",
    "What should I see first?",
    "How do I get there by train?",
    "What is the weather like in spring?",
    "Thank you, goodbye.",
)


@dataclass(frozen=True)
class RealtimeBenchConfig:
    model: str = "tiny"  # preset, checkpoint directory or hub id
    turns: int = 5  # spoken questions per conversation
    repeats: int = 3  # conversations per path; per turn the median
    max_tokens: int = 16  # text tokens per reply
    speech_tokens: int = 100  # codec tokens per reply (50 per second of speech): the server's default_speech_tokens
    out: str = "out/bench"  # realtime.json goes here
    sessions: tuple[int, ...] = (1, 4, 16)  # concurrent sessions per level of the turn-latency table

    @classmethod
    def from_args(cls, args) -> RealtimeBenchConfig:
        names = ("model", "turns", "repeats", "max_tokens", "speech_tokens", "out")
        kw = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        if getattr(args, "sessions", None):
            kw["sessions"] = tuple(int(x) for x in str(args.sessions).split(",") if x.strip())
        return cls(**kw)


def spoken_questions(n: int) -> list[bytes]:
    """n questions as PCM16 mono 24 kHz: espeak-ng speech (a tone of 1.5 s per question without espeak-ng)."""
    import librosa
    import soundfile as sf

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            if shutil.which("espeak-ng"):
                path = Path(tmp) / f"q{i}.wav"
                subprocess.run(
                    ["espeak-ng", "-w", str(path), QUESTIONS[i % len(QUESTIONS)]], check=True, capture_output=True
                )
                wav, sr = sf.read(path, dtype="float32")
                wav = librosa.resample(wav, orig_sr=sr, target_sr=RATE) if sr != RATE else wav
            else:
                wav = 0.3 * np.sin(2 * np.pi * (180 + 20 * i) * np.arange(int(1.5 * RATE)) / RATE)
            out.append((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    return out


def _wav(pcm: bytes) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.frombuffer(pcm, "<i2"), RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _until(conn, kind: str):
    """The next server event of type `kind` (an `error` event raises)."""
    while True:
        ev = await _recv(conn)
        if ev.type == kind:
            return ev


async def _recv(conn):
    """The next server event within EVENT_TIMEOUT_S (an `error` event raises)."""
    ev = await asyncio.wait_for(conn.recv(), EVENT_TIMEOUT_S)
    if ev.type == "error":
        raise RuntimeError(f"realtime error: {ev.error.message}")
    return ev


async def realtime_conversation(
    client, model: str, voice: str, questions: list[bytes], cfg: RealtimeBenchConfig, paced: bool = False
) -> list[dict]:
    """One session, one manual turn per question -> per turn {ttfa_s, reply}. paced: each 100 ms chunk is sent once
    it has been spoken (real time), the commit and response.create right after the last one, and the clock runs from
    the commit (the end of the user's speech); else the audio goes at once and the clock starts at response.create,
    sent once the server has answered input_audio_buffer.committed."""
    turns = []
    async with client.realtime.connect(model=model) as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["audio"],
                "audio": {"input": {"turn_detection": None}, "output": {"voice": voice}},
            }
        )
        await _until(conn, "session.updated")
        for pcm in questions:
            t_speech = time.perf_counter()
            for i in range(0, len(pcm), 2 * CHUNK):
                if paced:  # the chunk exists once its last sample has been spoken
                    spoken_s = min(len(pcm), i + 2 * CHUNK) / 2 / RATE
                    await asyncio.sleep(max(0.0, t_speech + spoken_s - time.perf_counter()))
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 2 * CHUNK]).decode())
            t0 = time.perf_counter()
            await conn.input_audio_buffer.commit()
            if not paced:
                await _until(conn, "input_audio_buffer.committed")
                t0 = time.perf_counter()
            await conn.response.create(response={"max_output_tokens": cfg.max_tokens})
            ttfa, reply = None, []
            while True:
                ev = await _recv(conn)
                if ev.type == "response.output_audio.delta" and ttfa is None:
                    ttfa = time.perf_counter() - t0
                elif ev.type == "response.output_audio_transcript.delta":
                    reply.append(ev.delta)
                elif ev.type == "response.done":
                    if ev.response.status not in ("completed", "incomplete"):
                        raise RuntimeError(f"realtime response {ev.response.status}")
                    break
            if ttfa is None:
                raise RuntimeError("a realtime reply without audio")
            turns.append({"ttfa_s": ttfa, "reply": "".join(reply)})
    return turns


async def chat_conversation(
    client,
    model: str,
    voice: str,
    questions: list[bytes],
    replies: list[str],
    cfg: RealtimeBenchConfig,
    paced: bool = False,
) -> list[dict]:
    """The same conversation as chat completions, each turn resending the earlier ones -> per turn {ttfa_s,
    prompt_tokens}. paced: each request waits the question's length first (the user speaking it)."""
    messages, turns = [], []
    for pcm, reply in zip(questions, replies):
        if paced:
            await asyncio.sleep(len(pcm) / 2 / RATE)
        messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(_wav(pcm)).decode(), "format": "wav"},
                    }
                ],
            }
        )
        t0, ttfa, prompt_tokens = time.perf_counter(), None, None
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            max_tokens=cfg.max_tokens,
            modalities=["text", "audio"],
            audio={"voice": voice, "format": "pcm16"},
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
            for ch in chunk.choices:
                if ttfa is None and (ch.delta.model_dump().get("audio") or {}).get("data"):
                    ttfa = time.perf_counter() - t0
        if ttfa is None:
            raise RuntimeError("a chat reply without audio")
        turns.append({"ttfa_s": ttfa, "prompt_tokens": prompt_tokens})
        messages.append({"role": "assistant", "content": reply})
    return turns


async def _measure(pipeline, url: str, cfg: RealtimeBenchConfig, questions: list[bytes]) -> tuple[dict, list]:
    """-> (per path, per conversation, per turn {ttfa_s, ...}; the concurrent sessions' levels)."""
    import openai

    from omni.serve.bench.realtime_sessions import measure_sessions
    from omni.serve.encoder_cache import EncoderCache

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model, voice = pipeline.model_name, pipeline.voices[0]
    cache_bytes = pipeline.encoder_cache.max_bytes if pipeline.encoder_cache is not None else 256 * 2**20
    await chat_conversation(client, model, voice, questions[:1], [""], cfg)  # warm-up: first-call costs of every stage
    runs: dict[str, list[list]] = {p: [] for p in PATHS}
    for r in range(cfg.repeats):
        pipeline.encoder_cache = EncoderCache(cache_bytes)  # each path from an empty cache
        rt = await realtime_conversation(client, model, voice, questions, cfg)
        replies = [t["reply"] for t in rt]
        pipeline.encoder_cache = EncoderCache(cache_bytes)
        chat = await chat_conversation(client, model, voice, questions, replies, cfg)
        pipeline.encoder_cache = None
        bare = await chat_conversation(client, model, voice, questions, replies, cfg)
        pipeline.encoder_cache = EncoderCache(cache_bytes)
        for path, turns in zip(PATHS, (rt, chat, bare)):
            runs[path].append(turns)
        print(f"[bench realtime] conversation {r + 1}/{cfg.repeats} done", flush=True)

    def fresh_cache():
        pipeline.encoder_cache = EncoderCache(cache_bytes)

    levels = await measure_sessions(
        client, url, model, voice, cfg, questions, fresh_cache, (realtime_conversation, chat_conversation)
    )
    await client.close()
    return runs, levels


def run_realtime_bench(cfg: RealtimeBenchConfig) -> dict:
    from omni.serve.api.local_server import LocalServer
    from omni.serve.api.server import ServerSettings, build_fastapi
    from omni.serve.bench.realtime_sessions import goals_json, session_goals
    from omni.serve.pipeline import Pipeline

    questions = spoken_questions(cfg.turns)
    pipeline = Pipeline.from_pretrained(cfg.model)
    settings = ServerSettings(default_speech_tokens=cfg.speech_tokens)
    with LocalServer(build_fastapi(pipeline, settings)) as server:
        # the clients in this thread's own loop; the server (and the pipeline's stages) in the server's thread
        runs, levels = asyncio.run(_measure(pipeline, f"http://127.0.0.1:{server.port}", cfg, questions))
    turns = []
    for k in range(cfg.turns):
        samples = {p: [run[k]["ttfa_s"] for run in runs[p]] for p in PATHS}
        turns.append(
            {
                "turn": k + 1,
                "question_s": len(questions[k]) / 2 / RATE,
                "prompt_tokens": runs["chat"][0][k]["prompt_tokens"],
                "ttfa_s": {p: statistics.median(v) for p, v in samples.items()},
                "samples_s": samples,
            }
        )
    first = turns[0]["ttfa_s"]
    ratios = {
        "vs_turn_1": {p: {t["turn"]: t["ttfa_s"][p] / first[p] for t in turns} for p in PATHS},
        "realtime_over_chat": {t["turn"]: t["ttfa_s"]["realtime"] / t["ttfa_s"]["chat"] for t in turns},
        "chat_over_chat_no_cache": {t["turn"]: t["ttfa_s"]["chat"] / t["ttfa_s"]["chat_no_cache"] for t in turns},
    }
    return {
        "config": asdict(cfg),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "turns": turns,
        "ratios": ratios,
        "sessions": levels,
        "goals": goals_json(session_goals(levels)),
    }


def markdown(r: dict) -> str:
    c, turns, ratios = r["config"], r["turns"], r["ratios"]
    lines = [
        f"## Time to first audio per turn of a spoken conversation ({c['model']}, {c['turns']} turns, median of "
        f"{c['repeats']}, replies of {c['max_tokens']} text / {c['speech_tokens']} codec tokens at most, "
        f"{r['cpu_cores']} CPU cores)",
        "",
        "| turn | question (s) | chat prompt tokens | realtime TTFA (s) | chat TTFA (s) | chat, no encoder cache, "
        "TTFA (s) | realtime / chat |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in turns:
        a = t["ttfa_s"]
        lines.append(
            f"| {t['turn']} | {t['question_s']:.2f} | {t['prompt_tokens']} | {a['realtime']:.3f} | "
            f"{a['chat']:.3f} | {a['chat_no_cache']:.3f} | {ratios['realtime_over_chat'][t['turn']]:.2f} |"
        )
    lines += [
        "",
        "Turn k's TTFA over turn 1's (1.00: a later turn answers as fast as the first):",
        "",
        "| turn | realtime | chat | chat, no encoder cache |",
        "|---|---|---|---|",
    ]
    for t in turns[1:]:
        k = t["turn"]
        lines.append(
            f"| {k} | {ratios['vs_turn_1']['realtime'][k]:.2f} | {ratios['vs_turn_1']['chat'][k]:.2f} | "
            f"{ratios['vs_turn_1']['chat_no_cache'][k]:.2f} |"
        )
    from omni.serve.bench.realtime_sessions import sessions_markdown

    return "\n".join(lines) + "\n\n" + sessions_markdown(r)


def main(args) -> int:
    cfg = RealtimeBenchConfig.from_args(args)
    if cfg.turns < 1 or cfg.repeats < 1 or not cfg.sessions or min(cfg.sessions) < 1:
        print("omni bench realtime: --turns, --repeats and every --sessions count must be >= 1")
        return 2
    results = run_realtime_bench(cfg)
    return save_and_print(cfg.out, "realtime.json", results, markdown(results))
