"""The demo's conversation bookkeeping, without a server: what each turn sends, and the reply's WAV."""

import base64
import wave

from omni.prompt import DEFAULT_SYSTEM_PROMPT
from omni.demos.gradio_app import Turn, chat_messages


def test_every_turn_sends_the_earlier_turns_media_and_replies(media_dir):
    image, speech = str(media_dir / "image.png"), str(media_dir / "speech.wav")
    first = Turn("What do you see and hear?", image=image, audio=speech, reply="A red square.", done=True)
    failed = Turn("Hello?", error="⚠️ The server refused the request (HTTP 400): unknown voice", done=True)
    new = Turn("And what colour is the circle?")
    messages = chat_messages([first, failed, new], DEFAULT_SYSTEM_PROMPT)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # the failed turn is left out
    assert messages[0]["content"] == DEFAULT_SYSTEM_PROMPT
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "input_audio", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(parts[1]["input_audio"]["data"]) == (media_dir / "speech.wav").read_bytes()
    assert parts[1]["input_audio"]["format"] == "wav"
    assert messages[2] == {"role": "assistant", "content": "A red square."}
    assert messages[3]["content"] == [{"type": "text", "text": "And what colour is the circle?"}]
    assert chat_messages([new], "  ")[0]["role"] == "user"  # an empty system box: the server's default applies


def test_video_and_other_audio_formats_go_as_data_uris(media_dir, tmp_path):
    flac = tmp_path / "speech.flac"
    flac.write_bytes(b"fLaC fake")
    parts = chat_messages([Turn("", audio=str(flac), video=str(media_dir / "clip.mp4"))], "")[0]["content"]
    assert [p["type"] for p in parts] == ["audio_url", "video_url"]
    assert parts[0]["audio_url"]["url"].startswith("data:audio/")
    assert parts[1]["video_url"]["url"].startswith("data:video/mp4;base64,")


def test_reply_speech_streams_in_pieces_then_stays_as_one_wav(tmp_path):
    turn = Turn("hi")
    assert turn.take_unplayed() is None
    turn.pcm += b"\x01\x00" * 480
    first = turn.take_unplayed()
    assert first[:4] == b"RIFF" and len(first) == 44 + 960 and turn.take_unplayed() is None
    turn.pcm += b"\x02\x00" * 240
    assert len(turn.take_unplayed()) == 44 + 480  # only what is new
    turn.finish(tmp_path)
    turn.finish(tmp_path)  # once
    assert turn.done and len(list(tmp_path.iterdir())) == 1
    with wave.open(turn.wav) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24000, 1, 2, 720)
