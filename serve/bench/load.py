"""`omni bench load`: many streaming HTTP clients against the Serve app for a while; statuses, latencies, 503s with
their Retry-After, and each replica's resident memory at the start and the end.

    omni bench load --model tiny --config tiny                 # starts `omni serve` itself: 32 clients x 60 s
    omni bench load --url http://127.0.0.1:8000 --ray-address 192.0.2.2:6379   # a running server (RSS from its Ray)

Each client is a closed loop: it sends a streaming chat completion (text, text + speech, with an image, with audio:
`mix`, in turn), reads the SSE stream to `[DONE]`, and sends the next; after a 503 it waits the Retry-After, then
sends the next. A warm-up at the same load comes first (its requests are reported apart), so that the replicas' memory
at "start" is their working level. "start" and "end" are each read once a phase's requests are over, as a replica's
lowest RSS over `rss_settle` seconds: the replicas hand freed pages back every few seconds (malloc_trim,
serve/cluster/deployments.py), so a reading taken at once would count pages already freed; a leak stays in the lowest
reading. Replica memory is read by process id from the server's Ray
(omni.serve.cluster.replicas): when this run starts the server, or with --ray-address / RAY_ADDRESS.
Writes load.json and load.md under `out` (the table is also printed).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from omni.serve.bench.load_results import LoadResults, Outcome, Phase, ReplicaMemory, markdown

__all__ = ["LoadConfig", "MIX_KINDS", "request_body", "one_request", "drive", "run_load", "write_load_report", "main"]

MIX_KINDS = ("text", "speech", "image", "audio+speech")  # what a request of the mix carries and asks for


@dataclass(frozen=True)
class LoadConfig:
    url: Optional[str] = None  # a running server; None: start `omni serve --model --config` for the run
    model: str = "tiny"  # with url None: the server's model
    config: str = "tiny"  # with url None: the server's serve config (configs/serve name or YAML path)
    clients: int = 32  # concurrent streaming clients
    duration: float = 60.0  # seconds of measured load
    warmup: float = 10.0  # seconds of the same load before it (RSS "start" is read after it)
    mix: tuple[str, ...] = MIX_KINDS  # request kinds (of MIX_KINDS), sent in turn
    max_tokens: int = 24  # text tokens per reply at most (greedy)
    speech_tokens: int = 48  # codec tokens per speech reply at most (50 per second of speech)
    request_timeout: float = 120.0  # a request not ended by then is a "timeout" (a hang)
    api_key: Optional[str] = None  # Bearer key, when the server wants one
    ray_address: Optional[str] = None  # with url: the server's Ray, for replica memory; None: RAY_ADDRESS, or none
    rss_tolerance: float = 0.10  # |end / start - 1| per replica that counts as flat
    rss_every: float = 5.0  # seconds between memory samples during the load
    rss_settle: Optional[float] = None  # seconds for start / end (their lowest reading); None: trim period + 1 s
    out: str = "out/bench-load"  # where load.json / load.md go

    def __post_init__(self):
        if self.clients < 1 or self.duration <= 0 or self.warmup < 0 or self.request_timeout <= 0:
            raise ValueError("clients must be >= 1, duration and request_timeout > 0, warmup >= 0")
        if not self.mix or set(self.mix) - set(MIX_KINDS):
            raise ValueError(f"mix must be among {', '.join(MIX_KINDS)}, got {', '.join(self.mix)}")
        if self.max_tokens < 1 or self.speech_tokens < 1:
            raise ValueError("max_tokens and speech_tokens must be >= 1")

    @classmethod
    def from_args(cls, args) -> LoadConfig:
        """From argparse args; flags absent or None take the defaults."""
        values = {}
        for f in fields(cls):
            v = getattr(args, f.name, None)
            if v is None:
                continue
            if f.name == "mix" and isinstance(v, str):
                v = tuple(x.strip() for x in v.split(",") if x.strip())
            values[f.name] = v
        return cls(**values)


# ---------------------------------------------------------------------------------------------------- requests
def _media_parts() -> dict[str, dict]:
    """An image (drawn) and the bundled speech sample as OpenAI content parts."""
    from omni.assets import samples_dir
    from omni.serve.bench.workload import drawn_image

    buf = io.BytesIO()
    drawn_image(0).save(buf, format="PNG")
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
    }
    speech = (samples_dir() / "speech.wav").read_bytes()
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech).decode(), "format": "wav"}}
    return {"image": image, "audio": audio}


def request_body(kind: str, i: int, cfg: LoadConfig, media: dict[str, dict]) -> dict:
    """Request i of kind (MIX_KINDS): streaming, greedy, bounded tokens, usage in the last chunk."""
    from omni.serve.bench.workload import QUESTIONS

    text = {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}
    content = [media[k] for k in ("image", "audio") if k in kind] + [text]
    body = {
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    if "speech" in kind:
        body.update(
            modalities=["text", "audio"],
            audio={"voice": "Chelsie", "format": "pcm16"},
            sampling_params_list=[{}, {"temperature": 0.0, "max_tokens": cfg.speech_tokens}],
        )
    return body


def _seconds(retry_after: str) -> float:
    """A Retry-After in seconds (an HTTP date, which this server never sends, counts as 1 s)."""
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 1.0


def _b64_len(data: str) -> int:
    return len(data) * 3 // 4 - data[-2:].count("=")


async def one_request(client, url: str, body: dict, t0: float, timeout: float, headers: dict) -> Outcome:
    """Send one streaming request and read it to its end; never raises (the outcome says what happened)."""
    import httpx

    speak = "modalities" in body
    start = time.monotonic() - t0
    info: dict = {}

    def out(kind: str, status: Optional[int]) -> Outcome:
        return Outcome(kind, status, speak, start, time.monotonic() - t0, **info)

    status = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                status = r.status_code
                if status != 200:
                    raw = await r.aread()
                    try:
                        info["error_code"] = json.loads(raw)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        pass
                    info["retry_after"] = r.headers.get("retry-after")
                    return out("refused" if status == 503 and info["retry_after"] else "http_error", status)
                finish, done, audio_bytes, text, chunks = None, False, 0, [], []
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        info["error_code"] = chunk["error"].get("code")
                        continue
                    now = time.monotonic() - t0 - start
                    for ch in chunk.get("choices") or ():
                        delta = ch.get("delta") or {}
                        if delta.get("content"):
                            info.setdefault("ttft", now)
                            text.append(delta["content"])
                        audio = delta.get("audio") or {}
                        if audio.get("data"):
                            info.setdefault("ttfap", now)
                            audio_bytes += _b64_len(audio["data"])
                            chunks.append((now, _b64_len(audio["data"]) / 2 / 24000))
                        finish = ch.get("finish_reason") or finish
                    if chunk.get("usage"):
                        info["completion_tokens"] = chunk["usage"].get("completion_tokens", 0)
                info.update(
                    audio_s=audio_bytes / 2 / 24000,  # PCM16 at 24 kHz
                    text="".join(text),
                    audio_chunks=tuple(chunks),
                )
                if "error_code" in info:
                    return out("error_event", status)
                return out("ok" if done and finish else "incomplete", status)
    except TimeoutError:
        return out("timeout", status)
    except (httpx.HTTPError, OSError):
        return out("transport", status)


async def drive(
    url: str,
    cfg: LoadConfig,
    seconds: float,
    t0: Optional[float] = None,
    on_outcome: Optional[Callable[[Outcome], None]] = None,
    stop: Optional[threading.Event] = None,
    transport=None,
) -> list[Outcome]:
    """`cfg.clients` closed-loop clients start requests for `seconds` (or until `stop` is set), then finish the ones
    they started -> every outcome, in the order they ended (times from `t0`, default now); `on_outcome` sees each
    as it ends. `transport`: an httpx transport (an in-process ASGI app); None: the network."""
    import httpx

    t0 = time.monotonic() if t0 is None else t0
    end = time.monotonic() + seconds
    media = _media_parts() if any(k != "text" and k != "speech" for k in cfg.mix) else {}
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    outcomes: list[Outcome] = []
    counter = iter(range(10**12))
    limits = httpx.Limits(max_connections=cfg.clients + 4, max_keepalive_connections=cfg.clients + 4)

    async def client_loop(client):
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            i = next(counter)
            body = request_body(cfg.mix[i % len(cfg.mix)], i, cfg, media)
            o = await one_request(client, url, body, t0, cfg.request_timeout, headers)
            outcomes.append(o)
            if on_outcome is not None:
                on_outcome(o)
            if o.kind == "refused":
                await asyncio.sleep(min(_seconds(o.retry_after), max(0.0, end - time.monotonic())))
            elif o.kind not in ("ok", "error_event"):
                await asyncio.sleep(0.2)  # no hot loop against a server that is gone

    async with httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.request_timeout, connect=30), limits=limits, transport=transport
    ) as client:
        await asyncio.gather(*[client_loop(client) for _ in range(cfg.clients)])
    return outcomes


# ---------------------------------------------------------------------------------------------------- memory
class _MemorySampler:
    """Every replica's settled RSS at `start()` and `stop()`, and its RSS every `every` seconds between (in a thread).
    Settled: the lowest of readings taken each second for `settle` seconds."""

    def __init__(self, every: float, settle: float):
        from omni.serve.cluster.replicas import list_replicas

        self.replicas = list_replicas()
        self.every, self.settle, self.samples = every, settle, []  # samples: [{replica name: Memory or None}]
        self.first: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict:
        from omni.serve.cluster.replicas import replica_memory

        sample = replica_memory(self.replicas)
        self.samples.append(sample)
        return sample

    def _settled(self) -> dict:
        """{replica name: its Memory with the lowest RSS over `settle` seconds (None: its process is gone)}."""
        lowest: dict = {}
        step = min(1.0, self.settle)
        for i in range(round(self.settle / step) + 1 if step > 0 else 1):
            if i:
                time.sleep(step)
            for name, m in self._sample().items():
                if m is None or name not in lowest or (lowest[name] is not None and m.rss < lowest[name].rss):
                    lowest[name] = m  # a process gone once stays gone
        return lowest

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def start(self) -> None:
        self.first = self._settled()
        self._thread.start()

    def stop(self) -> list[ReplicaMemory]:
        self._stop.set()
        self._thread.join()
        last = self._settled()

        def mb(m, part: str = "rss") -> Optional[float]:
            return None if m is None else getattr(m, part) / 2**20

        out = []
        for r in self.replicas:
            rss = [mb(s.get(r.name)) for s in self.samples]
            seen = [v for v in rss if v is not None]
            start, end = self.first.get(r.name), last.get(r.name)
            out.append(
                ReplicaMemory(
                    r.deployment,
                    r.name,
                    r.node_id,
                    r.pid,
                    mb(start),
                    mb(end),
                    max(seen) if seen else None,
                    rss,
                    mb(start, "anon"),
                    mb(end, "anon"),
                )
            )
        return out


# ---------------------------------------------------------------------------------------------------- the run
def _say(text: str) -> None:
    print(f"[bench load] {text}", file=sys.stderr, flush=True)


def _limit(config: Optional[str]) -> Optional[int]:
    from omni.serve.config import load_serve_config

    try:
        return load_serve_config(config).max_concurrent_requests if config else None
    except (OSError, ValueError):
        return None


def run_load(cfg: LoadConfig) -> LoadResults:
    """Start the server when `cfg.url` is None (and stop it after), warm up, run the load, read replica memory."""
    from omni.serve.cluster.process import ServeProcess, connect_ray

    t_run = time.monotonic()
    server, notes = None, []
    if cfg.url is None:
        _say(f"starting omni serve --model {cfg.model} --config {cfg.config} (its log: {cfg.out}/serve.log) ...")
        server = ServeProcess(
            ["--model", cfg.model, "--config", cfg.config] + (["--api-key", cfg.api_key] if cfg.api_key else []),
            Path(cfg.out) / "serve.log",
        ).start()
        url, ray_address = server.url, server.ray_address
    else:
        url, ray_address = cfg.url.rstrip("/"), cfg.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        sampler = None
        if ray_address:
            connect_ray(ray_address)
            from omni.serve.cluster.deployments import TRIM_EVERY_S

            settle = TRIM_EVERY_S + 1.0 if cfg.rss_settle is None else cfg.rss_settle
            sampler = _MemorySampler(cfg.rss_every, settle)
        else:
            notes.append("replica memory not read: no Ray address (--ray-address or RAY_ADDRESS)")
        t0 = time.monotonic()
        _say(f"warm-up: {cfg.clients} clients for {cfg.warmup:g} s")
        warm = asyncio.run(drive(url, cfg, cfg.warmup, t0)) if cfg.warmup > 0 else []
        if sampler is not None:
            sampler.start()
        _say(f"load: {cfg.clients} clients for {cfg.duration:g} s")
        t_load = time.monotonic()
        outcomes = asyncio.run(drive(url, cfg, cfg.duration, t0))
        load_s = time.monotonic() - t_load
        memory = sampler.stop() if sampler is not None else []
    finally:
        if server is not None:
            server.stop()
    return LoadResults(
        url=url,
        model=cfg.model if cfg.url is None else None,
        config=cfg.config if cfg.url is None else None,
        max_concurrent_requests=_limit(cfg.config if cfg.url is None else None),
        clients=cfg.clients,
        settings={f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "api_key"},
        warmup=Phase.of(warm, cfg.warmup),
        load=Phase.of(outcomes, load_s),
        replicas=memory,
        rss_tolerance=cfg.rss_tolerance,
        notes=notes,
        wall_s=time.monotonic() - t_run,
    )


def write_load_report(results: LoadResults, out: Path) -> str:
    """load.json and load.md under `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    md = markdown(results)
    (out / "load.md").write_text(md)
    return md


def main(args) -> int:
    """`omni bench load`: 0 when the run passed (LoadResults.passed), 1 otherwise."""
    cfg = LoadConfig.from_args(args)
    results = run_load(cfg)
    print(write_load_report(results, Path(cfg.out)))
    return 0 if results.passed else 1
