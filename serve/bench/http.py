"""`omni bench --via http`: the bench's requests as OpenAI bodies, sent by streaming clients to the Serve app, and read
as a user's client reads them (time to the first text delta, to the first audio delta, to `[DONE]`; each audio
packet's arrival, for playback continuity).

Request i of a level is the request `run.make_request` builds for the in-process paths: the same question, the same
media (the drawn picture as PNG, the bundled speech.wav, the bundled clip.mp4, as `data:` URIs, which the server decodes
to the arrays the in-process path loads), greedy, the same token bounds. So the official path, run in this process on
the same checkpoint, gives the replies the server should give: `run.matches` compares their text and audio length.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Optional

from omni.serve.bench.load import one_request
from omni.serve.bench.results import Sample

__all__ = ["HttpClient", "media_parts", "chat_body", "speech_body"]

SAMPLE_RATE = 24000  # PCM16 mono from the server


def media_parts(kinds) -> dict[str, dict]:
    """OpenAI content parts for the media kinds asked for (image, audio, video), the same media as run.load_media."""
    from omni.assets import samples_dir
    from omni.serve.bench.workload import drawn_image

    def uri(mime: str, data: bytes) -> str:
        return f"data:{mime};base64," + base64.b64encode(data).decode()

    parts = {}
    if "image" in kinds:
        buf = io.BytesIO()
        drawn_image(0).save(buf, format="PNG")
        parts["image"] = {"type": "image_url", "image_url": {"url": uri("image/png", buf.getvalue())}}
    if "audio" in kinds:
        data = base64.b64encode((samples_dir() / "speech.wav").read_bytes()).decode()
        parts["audio"] = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    if "video" in kinds:
        parts["video"] = {
            "type": "video_url",
            "video_url": {"url": uri("video/mp4", (samples_dir() / "clip.mp4").read_bytes())},
        }
    return parts


def chat_body(question: str, kind: str, speak: bool, max_tokens: int, speech_tokens: int, parts: dict) -> dict:
    """A streaming chat completion: the media of `kind` (or none for "text"), the question, greedy."""
    content = ([parts[kind]] if kind in parts else []) + [{"type": "text", "text": question}]
    body = {
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    if speak:
        body.update(
            modalities=["text", "audio"],
            audio={"voice": "Chelsie", "format": "pcm16"},
            sampling_params_list=[{}, {"temperature": 0.0, "max_tokens": speech_tokens}],
        )
    return body


def speech_body(text: str, speech_tokens: int) -> dict:
    """/v1/audio/speech reading `text` aloud, streamed raw PCM16, greedy Talker."""
    return {
        "input": text,
        "voice": "Chelsie",
        "response_format": "pcm",
        "sampling_params_list": [None, {"temperature": 0.0, "max_tokens": speech_tokens}],
    }


class HttpClient:
    """One httpx client for a level's streams; `chat(body)` and `speech(body)` -> results.Sample."""

    def __init__(
        self, url: str, clients: int, parts: dict, timeout: float = 600.0, transport=None, api_key: Optional[str] = None
    ):
        import httpx

        self.url = url.rstrip("/")
        self.parts = parts  # media_parts(): the content parts request bodies carry
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits, transport=transport)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stage_counters(self) -> dict[str, dict]:
        """The server's per-stage loop counters from /metrics ({} when it exports none): {stage: {steps, step_items,
        step_s, queued, queue_s}}, as omni.loop.LoopStats names them."""
        from prometheus_client.parser import text_string_to_metric_families

        r = await self.client.get(f"{self.url}/metrics", headers=self.headers)
        names = {
            "omni_stage_batch_size_count": "steps",
            "omni_stage_batch_size_sum": "step_items",
            "omni_stage_step_seconds_sum": "step_s",
            "omni_stage_queue_seconds_count": "queued",
            "omni_stage_queue_seconds_sum": "queue_s",
        }
        out: dict[str, dict] = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                if s.name in names and "stage" in s.labels:
                    out.setdefault(s.labels["stage"], {})[names[s.name]] = s.value
        return out

    async def chat(self, body: dict):
        o = await one_request(self.client, self.url, body, time.monotonic(), self.timeout, self.headers)
        if o.kind != "ok":
            raise RuntimeError(f"bench over HTTP: a request ended {o.kind} (status {o.status}, {o.error_code})")
        n_samples = round(o.audio_s * SAMPLE_RATE)
        return Sample(
            ttft=o.ttft if o.text else None,
            ttfap=o.ttfap,
            e2e=o.seconds,
            text_tokens=o.completion_tokens,
            codec_tokens=n_samples // 480,
            audio_s=o.audio_s,
            token_ids=None,
            codec_ids=None,
            text=o.text,
            audio_chunks=list(o.audio_chunks),
        )

    async def speech(self, body: dict):
        """The speech endpoint's raw PCM stream: each body chunk is an audio packet."""
        t0 = time.perf_counter()
        chunks, n_bytes = [], 0
        async with self.client.stream("POST", f"{self.url}/v1/audio/speech", json=body, headers=self.headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"bench over HTTP: /v1/audio/speech answered {r.status_code}: {await r.aread()!r}")
            async for data in r.aiter_bytes():
                if data:
                    chunks.append((time.perf_counter() - t0, len(data) / 2 / SAMPLE_RATE))
                    n_bytes += len(data)
        e2e = time.perf_counter() - t0
        audio_s = n_bytes / 2 / SAMPLE_RATE
        return Sample(
            ttft=None,
            ttfap=chunks[0][0] if chunks else None,
            e2e=e2e,
            text_tokens=0,
            codec_tokens=n_bytes // 2 // 480,
            audio_s=audio_s,
            token_ids=None,
            codec_ids=None,
            text=body["input"],
            audio_chunks=chunks,
        )
