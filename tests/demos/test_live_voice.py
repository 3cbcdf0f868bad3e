"""The demo's live voice mode in a real browser: headless Chromium (tests/demos/browser_page.py) with a fake
microphone that plays an espeak-ng question, the demo page (`launch_demo`) against the HTTP app over the in-process
tiny pipeline, /v1/realtime with a client secret the demo mints."""

from pathlib import Path

import pytest
from browser_page import chrome, el, free_port, open_page, wait
from spoken import espeak_wav

pytestmark = pytest.mark.slow
KEY = "sk-live-test"


def _fake_microphone(path: Path) -> Path:
    """A spoken question (espeak-ng), then 6 s of silence, as Chromium's fake microphone plays it: in a loop, so the
    question comes again while the reply to it still plays."""
    return espeak_wav("What is the capital of France?", path, 48000, pad_s=6)


def _live(driver) -> dict:
    return driver.execute_script("return window.omniLive ? window.omniLive.stats : null") or {}


def test_live_voice_answers_the_microphone_and_speaking_interrupts_it(pipeline, tmp_path):
    """Live voice in Chromium with a fake microphone: the page streams it to /v1/realtime (a client secret minted by
    the demo), the server's VAD ends the turn, the reply's audio deltas play and its transcript shows; the question
    heard again during the reply stops the playback and the server cancels the response."""
    from omni.demos.gradio_app import DemoSettings, launch_demo
    from omni.serve.api.local_server import LocalServer
    from omni.serve.api.server import ServerSettings, build_fastapi

    driver = chrome(
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={_fake_microphone(tmp_path / 'question.wav')}",
    )
    with LocalServer(build_fastapi(pipeline, ServerSettings(api_key=KEY))) as server:
        port = free_port()
        demo = launch_demo(DemoSettings(api_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY), "127.0.0.1", port)
        try:
            page = open_page(driver, f"http://127.0.0.1:{port}/")
            assert "Connected" in el(page, "#status").text
            el(page, "#live-start").click()
            wait(lambda: "session.created" in _live(page).get("events", ()), 30, "the realtime session to open")
            wait(lambda: _live(page)["audioDeltas"] >= 3, 60, "the reply's audio deltas")
            events = _live(page)["events"]
            order = [
                events.index(e)
                for e in (
                    "input_audio_buffer.speech_started",
                    "input_audio_buffer.speech_stopped",
                    "input_audio_buffer.committed",
                    "response.created",
                    "response.output_audio.delta",
                )
            ]
            assert order == sorted(order), events[:40]
            wait(
                lambda: page.execute_script(
                    "const e = document.querySelector('#live-log .live-assistant'); return e && e.textContent.trim()"
                ),
                30,
                "the reply's transcript on the page",
            )
            # the looped question comes again while the reply plays: barge-in
            wait(lambda: "cancelled" in _live(page)["responses"].values(), 45, "speaking to cancel the reply")
            stats = _live(page)
            assert stats["bargeIns"] >= 1 and stats["sentChunks"] > 20 and stats["audioBytes"] > 0
            assert not stats["errors"], stats["errors"]
            assert "[interrupted]" in el(page, "#live-log").text
            el(page, "#live-stop").click()
            wait(lambda: "off" in el(page, "#live-state").text, 10, "Stop to end the live session")
        finally:
            demo.close()
            driver.quit()
