"""Serve configs: both shipped YAML files load, give valid deployment options, and build the application graph."""
import pytest

from omni.serve.config import CONFIG_DIR, DeploymentOptions, ServeConfig, load_serve_config

STAGES = ("ingress", "vision_encoder", "audio_encoder", "thinker", "talker", "vocoder_deployment")


def test_tiny_fits_a_two_core_machine():
    cfg = load_serve_config("tiny")
    assert cfg.device == "cpu" and cfg.model == "tiny"
    assert sum(getattr(cfg, s).num_cpus for s in STAGES) <= 1.0  # leaves room on 2 cores for Ray itself
    assert all(getattr(cfg, s).num_gpus == 0 for s in STAGES)
    assert cfg.default_speech_tokens <= 512


def test_7b_config_places_stages_on_gpu_fractions():
    cfg = load_serve_config(str(CONFIG_DIR / "qwen2.5-omni-7b.yaml"))
    assert cfg.device == "cuda" and cfg.dtype == "bfloat16" and cfg.vocoder["device"] == "cuda"
    gpus = [getattr(cfg, s).num_gpus for s in STAGES]
    assert all(0 <= g <= 1 for g in gpus) and 0.9 <= sum(gpus) <= 1.0  # one GPU, shared
    opts = cfg.vision_encoder.serve_options()
    assert "autoscaling_config" in opts and "num_replicas" not in opts
    assert cfg.thinker.serve_options()["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}


def test_unknown_names_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_serve_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("thinker: {num_replica: 2}\n")  # a typo must not be ignored
    with pytest.raises(ValueError, match="num_replica"):
        load_serve_config(str(bad))
    assert ServeConfig().talker.batch_wait_s > 0 and DeploymentOptions().num_replicas == 1


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-omni-7b"])
def test_build_app_graph(name):
    from ray.serve import Application

    from omni.serve.app import build_app

    app = build_app({"model": "tiny", "config": name, "served_model_name": "omni-test"})
    assert isinstance(app, Application)
