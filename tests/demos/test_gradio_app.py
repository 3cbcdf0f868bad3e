"""The web demo in a real browser: `omni demo --api-key K --port P` as a user starts it (it starts `omni serve` on
the tiny default itself), driven by headless Chromium through Selenium and chromium-driver (Debian packages that
`make setup` installs), plus demos/client.py against the same server. One demo and one server for the module.

A screenshot of the page after an answer is saved to out/artifacts/demo.png (a test artifact); with
OMNI_UPDATE_SCREENSHOT=1 it also replaces assets/demo.png, the README's picture."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import pytest
from browser_page import chrome
from browser_page import el as _el
from browser_page import free_port as _free_port
from browser_page import open_page as _open
from browser_page import wait as _wait

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KEY = "sk-demo-test"
ARTIFACTS = REPO / "out" / "artifacts"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`omni demo` in a subprocess -> {"url": page, "api": the child server's /v1 URL, "proc", "log"}."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "omni.serve.cli", "demo", "--api-key", KEY, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    from omni.demos.gradio_app import READY_LINE

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"omni demo exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        return READY_LINE in log_path.read_text()

    try:
        _wait(ready, 480, "omni demo to start", every=1)
    except BaseException:
        proc.kill()
        raise
    api = re.search(r"omni serve is ready: (\S+)", log_path.read_text()).group(1)
    yield {"url": f"http://127.0.0.1:{port}/", "api": api, "proc": proc, "log": log_path}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    driver = chrome()
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, demo):
    """A fresh page on the demo, connected (its status line filled in by the page's load event)."""
    return _open(browser, demo["url"])


def _metrics(demo) -> dict[str, float]:
    text = httpx.get(demo["api"].removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(omni_[a-z_]+) (\S+)$", text, re.M)}


# ------------------------------------------------------------------------------------------------ page helpers
def _set_number(driver, elem_id: str, value) -> None:
    """A slider's number box: type the value, then leave the box (Gradio takes it on change)."""
    from selenium.webdriver.common.keys import Keys

    box = _el(driver, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)
    _wait(lambda: box.get_attribute("value") == str(value), 5, f"{elem_id} = {value}")


def _ask(driver, text: str) -> None:
    """Types a question and sends it; returns once the page shows it (a failing answer may already be over)."""
    asked = len(_asked(driver))
    _el(driver, "#prompt textarea").send_keys(text)
    _el(driver, "#send").click()
    _wait(lambda: len(_asked(driver)) > asked, 30, "the question to show in the chat")


def _asked(driver) -> list[str]:
    return [
        t
        for t in driver.execute_script(
            "return [...document.querySelectorAll('#chat [data-testid=user]')].map(e => e.innerText)"
        )
        if t.strip()
    ]


def _busy(driver) -> bool:
    """An answer is running: Send is disabled and Stop enabled (the page's own state, as a user sees it)."""
    return not _el(driver, "#send").is_enabled() and _el(driver, "#stop").is_enabled()


def _idle(driver) -> bool:
    return _el(driver, "#send").is_enabled() and not _el(driver, "#stop").is_enabled()


def _replies(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#chat [data-testid=bot]')].map(e => e.innerText)"
    )


def _chat_text(driver) -> str:
    return _el(driver, "#chat").text


def _upload(driver, elem_id: str, path) -> None:
    _el(driver, f"#{elem_id} input[type=file]").send_keys(str(path))


def _clear(driver) -> None:
    _el(driver, "#clear").click()
    _wait(lambda: not _replies(driver) and _idle(driver), 30, "Clear to empty the chat")


_CHAT_AUDIO = """
const audios = [...document.querySelectorAll('#chat audio')];
return Promise.all(audios.map(a => new Promise(done => {
    const report = () => done({src: a.currentSrc, duration: a.duration, ready: a.readyState,
                               error: a.error && a.error.message});
    if (a.readyState >= 1) return report();
    a.addEventListener('loadedmetadata', report, {once: true});
    a.addEventListener('error', report, {once: true});
    a.load();
})));
"""


def _chat_audio(driver) -> list[dict]:
    """The <audio> elements in the chat once the browser has loaded their metadata (or failed to)."""
    return driver.execute_async_script(
        f"const done = arguments[arguments.length - 1];(async () => {{ {_CHAT_AUDIO} }})().then(done);"
    )


def _speech_player(driver) -> dict:
    """The live (streaming) speech player's state."""
    return driver.execute_script(
        "const a = document.querySelector('#speech audio');"
        "return a ? {t: a.currentTime, paused: a.paused} : {t: 0, paused: true};"
    )


# ------------------------------------------------------------------------------------------------ the API and client
def test_voices_route_lists_the_models_voices(demo):
    base = demo["api"]
    r = httpx.get(f"{base}/audio/voices", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"object": "list", "model": "tiny", "voices": ["Chelsie", "Ethan"]}
    assert httpx.get(f"{base}/audio/voices").status_code == 401


def test_client_streams_text_and_writes_the_speech(demo, media_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "demos/client.py",
            "--api-url",
            demo["api"],
            "--api-key",
            KEY,
            "--image",
            str(media_dir / "image.png"),
            "--audio",
            str(media_dir / "speech.wav"),
            "--max-tokens",
            "16",
            "--out",
            str(tmp_path / "answer.wav"),
            "What do you see and hear?",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "no text streamed"
    with wave.open(str(tmp_path / "answer.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() > 0 and w.getnframes() % 480 == 0  # whole codec frames of 20 ms
    assert re.search(r"wrote .*answer\.wav: \d+\.\d\d s", out.stderr)


def test_client_reports_a_server_error(demo, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "demos/client.py",
            "--api-url",
            demo["api"],
            "--api-key",
            KEY,
            "--voice",
            "Nobody",
            "--out",
            str(tmp_path / "x.wav"),
            "hi",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "400" in out.stderr and "Chelsie" in out.stderr and "Ethan" in out.stderr


# ------------------------------------------------------------------------------------------------ the page
def test_page_fills_the_voices_from_the_server(page):
    assert "voices Chelsie, Ethan" in _el(page, "#status").text
    _el(page, "#voice input").click()

    def offered():
        return {
            t.replace("✓", "").strip()
            for t in page.execute_script(
                "return [...document.querySelectorAll('ul[role=listbox] li')].map(li => li.textContent)"
            )
        }

    _wait(lambda: {"Chelsie", "Ethan"} <= offered(), 10, "the voice list to offer Chelsie and Ethan")
    _el(page, "#prompt textarea").click()  # closes the list


def test_image_and_wav_question_streams_text_and_keeps_playable_speech(page, demo, media_dir):
    _upload(page, "image", media_dir / "image.png")
    _upload(page, "audio", media_dir / "speech.wav")
    _wait(
        lambda: (
            page.find_elements("css selector", "#image img")
            and page.find_elements("css selector", "#audio [data-testid^=waveform], #audio audio")
        ),
        30,
        "the uploads to show",
    )
    _set_number(page, "max-tokens", 40)  # a short answer: the screenshot shows the whole exchange
    before = _metrics(demo)
    _ask(page, "What do you see and hear?")
    _wait(lambda: _idle(page), 180, "the answer to end")
    replies = _replies(page)
    assert replies and replies[0].strip(), "no text in the chat"
    assert page.find_elements("css selector", "#chat img"), "the uploaded image is not in the chat"
    assert "⚠️" not in _chat_text(page)
    audio = _chat_audio(page)
    assert len(audio) == 1, audio
    assert audio[0]["error"] is None and audio[0]["ready"] >= 1 and audio[0]["duration"] > 0.2, audio
    wav = httpx.get(audio[0]["src"]).content  # the player's src: the reply's whole WAV, for replay and download
    assert wav[:4] == b"RIFF" and len(wav) > 44 + 2 * 24000 * 0.2
    after = _metrics(demo)
    first_prompt = after["omni_prompt_tokens_total"] - before["omni_prompt_tokens_total"]
    assert first_prompt > 100  # image and audio placeholders: the uploads reached the model

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(ARTIFACTS / "demo.png"))
    if os.environ.get("OMNI_UPDATE_SCREENSHOT") == "1":
        shutil.copy(ARTIFACTS / "demo.png", REPO / "assets" / "demo.png")

    # a second turn sends the first one again (its media, and the model's reply) before the new question
    _ask(page, "And what colour is it?")
    _wait(lambda: _idle(page), 180, "the second answer to end")
    second_prompt = _metrics(demo)["omni_prompt_tokens_total"] - after["omni_prompt_tokens_total"]
    assert second_prompt > first_prompt + 10, (first_prompt, second_prompt)
    assert len(_replies(page)) >= 2 and len(_chat_audio(page)) == 2


# A greedy tiny answer of 4000 tokens lasts 8 s on a quiet machine and up to 30 s in the loaded suite, where Gradio's
# player once took 26 s of it to start: such an answer can end on its own before the player starts or before Stop
# lands. Then the next question is asked (at most these many), and the checks hold for the answer that Stop ended.
STORIES = ["Tell me a long story.", "Tell me another long story.", "Write a very long poem about the sea."]


def _speak_then_stop(page, replies: int) -> bool:
    """Waits for speech to play while the current answer is still being written, for more text after that, then
    presses Stop. True once Stop ended the answer; False when the answer ended on its own first."""
    lengths = set()

    def speaking_while_writing_or_ended():
        if len(_replies(page)) > replies and _idle(page):
            return "ended"
        lengths.add(len("".join(_replies(page))))
        if _busy(page) and _speech_player(page)["t"] > 0.2 and len(lengths) >= 3:
            return "speaking"
        return None

    # bounded generously: in the whole suite (a loaded machine) Gradio's player took over 120 s to start once
    if _wait(speaking_while_writing_or_ended, 300, "speech while the answer is written", every=0.3) == "ended":
        return False
    n = len("".join(_replies(page)))

    def more_text_or_the_end():
        if len("".join(_replies(page))) > n and _busy(page):
            return "more text"
        return "ended" if _idle(page) else None

    if _wait(more_text_or_the_end, 60, "more text after the speech started") == "ended":
        return False
    _el(page, "#stop").click()
    _wait(lambda: _idle(page), 30, "Stop to end the answer")
    return "⏹ stopped" in "".join(_replies(page)[replies:])


def test_speech_plays_while_text_streams_and_stop_ends_the_answer(page, demo):
    _set_number(page, "max-tokens", 4000)
    before = _metrics(demo)
    for question in STORIES:
        replies = len(_replies(page))
        _ask(page, question)
        if _speak_then_stop(page, replies):
            break
    else:
        pytest.fail(f"each of {len(STORIES)} answers ended on its own before Stop could end it")
    settled = len("".join(_replies(page)))
    time.sleep(1.5)
    assert len("".join(_replies(page))) == settled, "the answer kept growing after Stop"
    # the server freed the request: the disconnect was seen as a cancel, nothing is in flight any more
    _wait(lambda: _metrics(demo)["omni_requests_in_flight"] == 0, 30, "the server to free the request")
    assert _metrics(demo)["omni_requests_cancelled_total"] >= before["omni_requests_cancelled_total"] + 1
    assert _chat_audio(page)[-1]["duration"] > 0, "the stopped reply keeps the speech it had"


def test_server_errors_show_as_messages(page, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.keys import Keys

    voice = _el(page, "#voice input")  # a voice the server does not have: 400, listing the valid ones
    voice.send_keys(Keys.CONTROL, "a")
    voice.send_keys("Nobody", Keys.ENTER)
    _el(page, "#prompt textarea").click()
    _ask(page, "Hello?")
    _wait(lambda: _idle(page), 60, "the failed answer to end")
    text = _chat_text(page)
    assert "HTTP 400" in text and "unknown voice" in text and "Chelsie" in text, text
    assert "Traceback" not in text

    voice.send_keys(Keys.CONTROL, "a")
    voice.send_keys("Ethan", Keys.ENTER)
    big = tmp_path / "big.png"  # 36 M pixels, over the server's max_image_pixels (32 M): 413
    Image.new("L", (6000, 6000), 128).save(big)
    _upload(page, "image", big)
    _wait(lambda: page.find_elements("css selector", "#image img"), 30, "the upload to show")
    _ask(page, "What is this?")
    _wait(lambda: _idle(page), 60, "the failed answer to end")
    text = _chat_text(page)
    assert "HTTP 413" in text and "max_image_pixels" in text, text
    assert "Traceback" not in text


def test_busy_and_unreachable_servers_show_as_messages(browser, tiny):
    """The same page against the HTTP layer at its concurrency limit (503), then with that server gone."""
    from omni.demos.gradio_app import DemoSettings, launch_demo
    from omni.serve.api.local_server import LocalServer
    from omni.serve.api.server import ServerSettings, build_fastapi
    from omni.serve.pipeline import Pipeline

    app = build_fastapi(Pipeline(tiny), ServerSettings(max_concurrent_requests=0))  # every chat request: 503
    with LocalServer(app) as server:
        port = _free_port()
        demo = launch_demo(DemoSettings(api_url=f"http://127.0.0.1:{server.port}/v1"), "127.0.0.1", port)
        try:
            page = _open(browser, f"http://127.0.0.1:{port}/")
            assert "Connected" in _el(page, "#status").text
            _ask(page, "Are you there?")
            _wait(lambda: _idle(page), 60, "the failed answer to end")
            assert "HTTP 503" in _chat_text(page) and "busy" in _chat_text(page)
            server.__exit__()  # the server goes down
            _ask(page, "Still there?")
            _wait(lambda: _idle(page), 60, "the failed answer to end")
            assert "Cannot reach the server" in _chat_text(page)
            assert "Traceback" not in _chat_text(page)
            page = _open(browser, f"http://127.0.0.1:{port}/")  # a page opened while it is down says so
            assert "Cannot reach the server" in _el(page, "#status").text
        finally:
            demo.close()


def test_demo_exit_stops_its_server(demo):
    port = int(re.search(r":(\d+)/v1", demo["api"]).group(1))
    demo["proc"].send_signal(signal.SIGTERM)
    assert demo["proc"].wait(120) == 0, demo["log"].read_text()[-3000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
