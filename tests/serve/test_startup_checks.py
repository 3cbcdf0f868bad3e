"""A model that cannot be loaded, or a transformers outside the supported versions, fails at start: one line on stderr
naming the cause and exit code 2 (no traceback), before Ray starts or anything is loaded."""

import json

import pytest

from omni.serve.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("omni: ") and "Traceback" not in err
    return lines[0]


def _not_omni(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (d / "model.safetensors").write_bytes(b"")
    return d


@pytest.mark.parametrize(
    "cmd", [["chat", "hi"], ["serve"], ["speak", "hi"], ["caption", "x.png", "--out", "o.jsonl"], ["bench", "--quick"]]
)
def test_a_missing_directory_fails_in_one_line(cmd, capsys):
    assert main(cmd + ["--model", "/nonexistent/omni-model"]) == 2
    line = _one_line(capsys)
    assert "cannot load model '/nonexistent/omni-model'" in line and "no such directory" in line


@pytest.mark.parametrize("cmd", [["chat", "hi"], ["serve"]])
def test_each_cause_is_named(cmd, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    causes = {
        str(empty): "has no config.json",
        str(no_weights): "no weights",
        "omni-test/no-such-model": "hub is offline (HF_HUB_OFFLINE=1); pass a local checkpoint path",
        str(_not_omni(tmp_path)): "not a Qwen-Omni checkpoint (model_type 'llama'",
    }
    for model, cause in causes.items():
        assert main(cmd + ["--model", model]) == 2
        line = _one_line(capsys)
        assert line.startswith(f"omni: cannot load model {model!r}: ") and cause in line, line


def test_bench_checks_every_model_but_not_a_remote_servers(capsys):
    assert main(["bench", "--model", "tiny,/nonexistent/b", "--quick"]) == 2
    assert "'/nonexistent/b'" in _one_line(capsys)
    from omni.serve.cli import _models_to_load, parser

    assert _models_to_load(parser().parse_args(["bench", "load", "--url", "http://h:1", "--model", "x/y"])) == []


def test_the_library_raises_the_same_errors(tmp_path, monkeypatch):
    from omni.checkpoint import ModelNotFoundError, NotOmniModelError, check_model, load_model
    from omni.parts import load_talker_part, load_tower

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model("/nonexistent/omni-model")
    with pytest.raises(ModelNotFoundError, match="offline"):
        load_talker_part("omni-test/no-such-model")
    with pytest.raises(NotOmniModelError):
        load_tower(str(_not_omni(tmp_path)), "visual")
    path, cfg, arch = check_model("tiny")
    assert arch == "qwen2.5-omni" and cfg["model_type"] == "qwen2_5_omni"


@pytest.mark.parametrize("version", ["5.23.0", "4.57.1", "6.0.0", "garbage"])
def test_an_unsupported_transformers_fails_at_start(version, monkeypatch, capsys):
    import transformers

    from omni.checkpoint import VersionError, check_versions, load_model
    from omni.serve.pipeline import Pipeline

    monkeypatch.setattr(transformers, "__version__", version)
    need = rf"transformers {version} is installed but omni needs transformers>=5.24,<6"
    with pytest.raises(VersionError, match=need):
        check_versions()
    with pytest.raises(VersionError):
        load_model("tiny")
    with pytest.raises(VersionError):
        Pipeline.from_pretrained("tiny")
    assert main(["chat", "hi"]) == 2
    assert f"transformers {version} is installed" in _one_line(capsys)


def test_supported_transformers_passes(monkeypatch):
    import transformers

    from omni.checkpoint import check_versions

    for version in ("5.24.0", "5.25.0", "5.99.1", "5.26.0.dev0"):
        monkeypatch.setattr(transformers, "__version__", version)
        check_versions()
