"""Fixtures of the cluster tests: for `omni caption`, a mixed folder of real media (good and bad files) and the oracle,
the official transformers `generate` on the request `omni chat --KIND F PROMPT` builds; `omni_serve` for a module's own
servers; the shared `omni serve` (SharedServer, `tiny_app`) and its fixtures (`server`, `client`, `uris`);
`start_cluster` for the modules that run a Ray cluster of several nodes on this machine."""

import base64
import os
import shutil
from pathlib import Path

import pytest
import yaml

from omni.serve.caption_io import DEFAULT_PROMPTS, ROW_FIELDS
from omni.serve.config import CONFIG_DIR

MAX_TOKENS = 8  # caption tokens in the golden runs

# name -> (media type, ok); made from the session's real media (tests/conftest.py)
MIXED = {
    "image.png": ("image", True),
    "speech.wav": ("audio", True),
    "clip.mp4": ("video", True),
    "sub/drawing.jpg": ("image", True),
    "sub/voice.bin": ("audio", True),  # a WAV under a name that says nothing: sniffed from the bytes
    "corrupt.png": ("image", False),  # PNG signature, garbage after it
    "truncated.mp4": ("video", False),  # the first half of clip.mp4
    "empty.wav": (None, False),
    "notes.txt": (None, False),
}


def _kill_unfinished_node(exc: BaseException) -> None:
    """The processes of a Ray node whose start raised (its constructor raised: nothing else holds the Node)."""
    from ray._private.node import Node

    tb = exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("self")
        if isinstance(node, Node):
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            return
        tb = tb.tb_next


def start_cluster(*nodes: dict):
    """A `ray.cluster_utils.Cluster` of `nodes` (add_node's arguments; the first is the head) -> (cluster, [Node]).

    A node's raylet gives its agents (Python processes it starts) 15 s to report their ports, then aborts, and Ray
    2.60 has no setting to lengthen that wait. On this 2-core machine under the suite's load an agent once took 24 s to
    start (CI, 2026-12-07: "The current node timed out during startup"; its agents start in 1.5-6 s otherwise), so a
    cluster whose start fails that way is started once more; any other failure is raised."""
    from ray.cluster_utils import Cluster

    for attempt in (1, 2):
        cluster = Cluster()
        try:
            return cluster, [cluster.add_node(**args) for args in nodes]
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            _kill_unfinished_node(exc)
            cluster.shutdown()
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def mixed_dir(media_dir, tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("mixed")
    (d / "sub").mkdir()
    for name in ("image.png", "speech.wav", "clip.mp4"):
        shutil.copy(media_dir / name, d / name)
    im = Image.new("RGB", (96, 128), (20, 160, 90))
    ImageDraw.Draw(im).rectangle((10, 30, 80, 100), fill=(240, 240, 30))
    im.save(d / "sub" / "drawing.jpg", quality=90)
    shutil.copy(media_dir / "speech.wav", d / "sub" / "voice.bin")
    png = (media_dir / "image.png").read_bytes()
    (d / "corrupt.png").write_bytes(png[:33] + bytes(range(256)) * 2)
    mp4 = (media_dir / "clip.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (d / "empty.wav").write_bytes(b"")
    (d / "notes.txt").write_text("not media\n")
    (d / ".hidden.png").write_bytes(png)  # skipped: hidden
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")) == sorted(
        MIXED
    )
    return d


@pytest.fixture(scope="session")
def oracle(tiny):
    """oracle(path, kind, prompt, max_tokens, use_audio_in_video=False) -> ReferenceResult of the official generate on
    the request `omni chat` builds for that file and prompt (greedy); cached."""
    from omni.reference import reference_generate
    from omni.serve.cli import build_chat_request, parser

    cache = {}

    def run(path, kind, prompt, max_tokens, use_audio_in_video=False):
        key = (str(path), kind, prompt, max_tokens, use_audio_in_video)
        if key not in cache:
            argv = ["chat", f"--{kind}", str(path), "--max-tokens", str(max_tokens), prompt]
            if use_audio_in_video:
                argv.insert(1, "--use-audio-in-video")
            cache[key] = reference_generate(tiny, build_chat_request(parser().parse_args(argv)))
        return cache[key]

    return run


def check_rows(rows, folder, oracle, max_tokens=MAX_TOKENS, prompt=None, names=MIXED):
    """One row per file; ok rows carry the official generate's caption; error rows exactly as specified."""
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows) == len(names)
    for name, (kind, ok) in names.items():
        r = by_path[str(folder / name)]
        assert list(r) == list(ROW_FIELDS)
        assert r["media_type"] == kind and r["model"] == "tiny"
        assert r["prompt"] == (prompt or DEFAULT_PROMPTS.get(kind, ""))
        if ok:
            ref = oracle(folder / name, kind, r["prompt"], max_tokens)
            assert r["error"] is None, (name, r["error"])
            assert r["caption"] == ref.text and r["num_tokens"] == len(ref.token_ids) > 0, name
            assert r["seconds"] > 0
        else:
            assert r["caption"] == "" and r["num_tokens"] == 0 and r["error"] and "\n" not in r["error"], name
    errors = {os.path.relpath(r["path"], folder): r["error"] for r in rows if r["error"]}
    assert errors["empty.wav"] == "empty file (0 bytes)"
    assert errors["notes.txt"].startswith("unsupported file: not an image, audio or video (10 bytes")
    assert errors["corrupt.png"].startswith("not a decodable image (looks like PNG")
    assert errors["truncated.mp4"].startswith("not a decodable video file (looks like MP4")


REPO = Path(__file__).resolve().parents[3]


def _start_serve(args, tmp_path_factory):
    """`omni serve ARGS` on a free port, once its ready line is out (the test fails with its log's tail if not)."""
    from omni.serve.cluster.process import ServeProcess, ServeStartError

    try:
        return ServeProcess(list(args), tmp_path_factory.mktemp("serve") / "serve.log", cwd=str(REPO)).start()
    except ServeStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def omni_serve(tmp_path_factory):
    """`omni_serve(*args, connect=True) -> ServeProcess`: start `omni serve ARGS` on a free port, wait for its ready
    line and (with connect) join its Ray; every server the module started is stopped (SIGTERM) after the module."""
    from omni.serve.cluster.process import ServeProcess

    started = []

    def start(*args: str, connect: bool = True) -> ServeProcess:
        server = _start_serve(args, tmp_path_factory)
        started.append(server)
        if connect:
            server.connect_ray()
        return server

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------------------------------------------- shared server
APP_KEY = "sk-test"  # the shared server's --api-key
APP_LIMIT = 24  # its max_concurrent_requests: below test_app_faults' 32 load clients, so 503s happen
APP_STAGE_TIMEOUT_S = 30  # its stage_timeout_s: a call waiting for a replica that died gives up after this


class SharedServer:
    """One `omni serve --model tiny` for the modules that only talk to it over HTTP and handles (test_app,
    test_app_faults, then test_app_shutdown, which stops it): a server start costs ~1-2 min here. Started on first
    use, started again if a user stopped it, stopped as soon as the next test does not use it (so no other module's
    Ray finds it running)."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.server = tmp_path_factory, None

    def get(self):
        """The running server, this process joined to its Ray."""
        if self.server is None or self.server.proc.poll() is not None:
            cfg = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
            # one deployment per generating stage (tiny.yaml co-locates them; test_qwen3_app and test_two_nodes run
            # that layout): the chain of handle calls, and each stage's replica killed on its own in test_app_faults
            cfg.update(max_concurrent_requests=APP_LIMIT, stage_timeout_s=APP_STAGE_TIMEOUT_S, colocate="none")
            path = self.tmp.mktemp("config") / "app.yaml"
            path.write_text(yaml.safe_dump(cfg))
            args = ["--model", "tiny", "--config", str(path), "--api-key", APP_KEY, "--drain-timeout", "60"]
            self.server = _start_serve(args, self.tmp)
        self.server.connect_ray()
        return self.server

    def take(self):
        """The running server, handed over to a caller that stops it itself (this process leaves its Ray first)."""
        import ray

        server = self.get()
        self.server = None
        ray.shutdown()
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


_SHARED: dict = {}


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory) -> SharedServer:
    _SHARED["app"] = SharedServer(tmp_path_factory)
    yield _SHARED["app"]
    _SHARED.pop("app").stop()


def pytest_runtest_teardown(item, nextitem):
    shared = _SHARED.get("app")
    if shared is not None and (nextitem is None or "tiny_app" not in nextitem.fixturenames):
        shared.stop()


# ---------------------------------------------------------------------------------------------------- its fixtures
@pytest.fixture(scope="module")
def server(tiny_app):
    """The shared `omni serve`'s URL: `omni serve` itself, in a subprocess (its own local Ray, --api-key sk-test);
    this process joins that Ray for handles. For test_app and test_app_clients; a module that needs the ServeProcess
    itself overrides `server` (test_app_faults)."""
    return tiny_app.get().url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="sk-test", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def uris(media_dir):
    def uri(name, mime):
        return f"data:{mime};base64," + base64.b64encode((media_dir / name).read_bytes()).decode()

    return {
        "image": uri("image.png", "image/png"),
        "audio": uri("speech.wav", "audio/wav"),
        "video": uri("clip.mp4", "video/mp4"),
        "audio_b64": base64.b64encode((media_dir / "speech.wav").read_bytes()).decode(),
    }
