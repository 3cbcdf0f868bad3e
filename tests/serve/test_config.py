"""The typed config tree: the shipped YAML files load; unknown keys and bad values are refused with their path;
`build_app` validates its arguments and gives each deployment the options its YAML section says."""

import pytest
import yaml

from omni.engine import EngineConfig
from omni.talker import TalkerConfig
from omni.decoders import VocoderConfig
from omni.encoders.media import MediaLimits
from omni.serve.config import CONFIG_DIR, ConfigError, Deployments, PipelineConfig, ServeConfig, load_serve_config

STAGES = tuple(Deployments.model_fields)


def test_tiny_fits_a_two_core_machine():
    cfg = load_serve_config("tiny")
    assert cfg.device == "cpu" and cfg.model == "tiny" and cfg.torch_dtype == "float32"
    d = cfg.deployments
    assert sum(getattr(d, s).num_cpus for s in STAGES) <= 1.0  # leaves room on 2 cores for Ray itself
    assert all(getattr(d, s).num_gpus == 0 for s in STAGES)
    assert cfg.default_speech_tokens <= 512
    assert isinstance(cfg, PipelineConfig)  # the in-process pipeline takes the same tree
    assert cfg.talker == TalkerConfig(max_num_seqs=64, batch_wait_s=0.01, emit_every=4)
    assert cfg.vocoder == VocoderConfig(first_chunk_codes=12, chunk_codes=36, past_blocks=2, future_blocks=1)


def test_7b_config_places_stages_on_gpu_fractions():
    cfg = load_serve_config(str(CONFIG_DIR / "qwen2.5-omni-7b.yaml"))
    assert cfg.device == "cuda" and cfg.dtype == "bfloat16"
    gpus = [getattr(cfg.deployments, s).num_gpus for s in STAGES]
    assert all(0 <= g <= 1 for g in gpus) and 0.9 <= sum(gpus) <= 1.0  # one GPU, shared
    opts = cfg.deployments.vision_encoder.serve_options()
    assert "autoscaling_config" in opts and "num_replicas" not in opts
    assert cfg.deployments.thinker.serve_options()["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert cfg.media == MediaLimits(max_video_seconds=300, max_video_frames=384)


def test_qwen3_config_gives_the_thinker_a_gpu_and_shares_another():
    from omni.decoders import Code2WavConfig

    cfg = load_serve_config("qwen3-omni-30b-a3b")
    assert cfg.device == "cuda" and cfg.dtype == "bfloat16" and cfg.model == "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    d = cfg.deployments
    assert d.thinker.num_gpus == 1.0  # its own GPU
    shared = [d.talker, d.vocoder, d.vision_encoder, d.audio_encoder]
    assert all(0 < x.num_gpus < 1 for x in shared) and abs(sum(x.num_gpus for x in shared) - 1.0) < 1e-9
    assert cfg.code2wav == Code2WavConfig(first_chunk_frames=2, chunk_frames=8) and cfg.talker.emit_every_frames == 1


def test_build_app_for_a_text_only_checkpoint_has_no_speech_chain(tmp_path):
    from omni.tiny_qwen3 import build_qwen3_checkpoint
    from omni.serve.app import build_app

    path = build_qwen3_checkpoint(tmp_path / "captioner", audio_output=False)
    deps = _deployments(build_app({"model": str(path), "config": "tiny"}))
    assert set(deps) == {"Ingress", "VisionEncoder", "AudioEncoder", "Thinker"}
    assert deps["Ingress"].init_args[-1] == []  # no voices: a request for audio is a 400


def test_each_default_lives_with_its_stage():
    cfg = ServeConfig()
    assert cfg.thinker == EngineConfig() and cfg.talker == TalkerConfig() and cfg.vocoder == VocoderConfig()
    assert cfg.media == MediaLimits() and cfg.talker.batch_wait_s > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("vocoder: {first_chunk_codez: 12}\n", "vocoder.first_chunk_codez: unknown field"),
        ("thinker: {num_replica: 2}\n", "thinker.num_replica: unknown field"),
        ("deployments: {ingress: {max_num_seqs: 4}}\n", "deployments.ingress.max_num_seqs: unknown field"),
        (
            "deployments: {talker: {num_cpus: -1}}\n",
            "deployments.talker.num_cpus: Input should be greater than or equal to 0",
        ),
        ("media: {max_video_framez: 3}\n", "media.max_video_framez: unknown field"),
        ("talker: {emit_every: 0}\n", "talker: emit_every must be >= 1"),
        ("thinker: {max_num_seqs: 0}\n", "thinker: max_num_seqs and max_dead_columns must be >= 1"),
        ("vocoder: {past_blocks: 1}\n", "vocoder: VocoderConfig: past_blocks must be >= 2"),
        ("dtype: float8\n", "dtype: dtype must be float32, bfloat16 or float16"),
        ("max_model_len: many\n", "max_model_len: Input should be a valid integer"),
        ("colocate: thinker+vocoder\n", "colocate: Input should be 'none', 'thinker+talker', 'talker+vocoder' or"),
    ],
)
def test_bad_keys_and_values_are_refused_with_their_path(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_serve_config(str(bad))
    assert message in str(e.value) and str(bad) in str(e.value)


def test_unknown_config_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="'qwen2.5-omni-7b', 'qwen3-omni-30b-a3b', 'tiny'"):
        load_serve_config("no-such-config")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_serve_config(str(tmp_path / "list.yaml"))


def _deployments(app) -> dict:
    """name -> ray.serve Deployment, walking the bound graph from the ingress."""
    from ray.serve import Application

    out = {}

    def walk(a):
        d = a._bound_deployment
        if d.name not in out:
            out[d.name] = d
            for arg in d.init_args:
                if isinstance(arg, Application):
                    walk(arg)

    walk(app)
    return out


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-omni-7b", "qwen3-omni-30b-a3b"])
def test_build_app_gives_each_deployment_its_yaml_options(name):
    """Each deployment has its YAML options; a group of co-located stages (colocate) its first stage's, with the
    CPUs and GPUs of all its stages summed."""
    from omni.serve.app import build_app
    from omni.serve.cluster.deployments import group_name

    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["deployments"]
    groups = load_serve_config(name).generation_groups
    want_of = {
        "Ingress": ["ingress"],
        "VisionEncoder": ["vision_encoder"],
        "AudioEncoder": ["audio_encoder"],
        **{group_name(g): list(g) for g in groups},
    }
    deps = _deployments(build_app({"model": "tiny", "config": name, "served_model_name": "omni-test"}))
    assert set(deps) == set(want_of)
    for dep_name, keys in want_of.items():
        d, want = deps[dep_name], raw[keys[0]]
        assert d.ray_actor_options["num_cpus"] == pytest.approx(sum(raw[k]["num_cpus"] for k in keys)), dep_name
        assert d.ray_actor_options.get("num_gpus", 0) == pytest.approx(sum(raw[k].get("num_gpus", 0) for k in keys))
        assert d.max_ongoing_requests == want.get("max_ongoing_requests", 64), dep_name
        if "autoscaling_config" in want:
            auto = d._deployment_config.autoscaling_config
            assert (auto.min_replicas, auto.max_replicas) == (
                want["autoscaling_config"]["min_replicas"],
                want["autoscaling_config"]["max_replicas"],
            )
        else:
            assert d.num_replicas == want["num_replicas"], dep_name
    # the speech chain is bound in order: Ingress -> the last group -> ... -> the Thinker's group
    names = lambda d: [a._bound_deployment.name for a in d.init_args if hasattr(a, "_bound_deployment")]  # noqa: E731
    for before, after in zip(groups, groups[1:]):
        assert names(deps[group_name(after)]) == [group_name(before)]
    assert names(deps[group_name(groups[0])]) == []
    assert names(deps["Ingress"]) == ["VisionEncoder", "AudioEncoder", group_name(groups[0]), group_name(groups[-1])]


@pytest.mark.parametrize(
    "colocate, groups",
    [
        ("none", [("thinker",), ("talker",), ("vocoder",)]),
        ("thinker+talker", [("thinker", "talker"), ("vocoder",)]),
        ("talker+vocoder", [("thinker",), ("talker", "vocoder")]),
        ("thinker+talker+vocoder", [("thinker", "talker", "vocoder")]),
    ],
)
def test_colocate_groups_adjacent_stages_into_one_deployment(tmp_path, colocate, groups):
    from omni.serve.app import build_app
    from omni.serve.cluster.builder import stage_deployments

    path = tmp_path / "layout.yaml"
    path.write_text(f"colocate: {colocate}\n")
    cfg = load_serve_config(str(path))
    assert cfg.generation_groups == groups
    deps = _deployments(build_app({"model": "tiny", "config": str(path)}))
    named = stage_deployments(cfg)
    assert set(deps) == {"Ingress", "VisionEncoder", "AudioEncoder", *named.values()}
    assert [named[s] for s in ("thinker", "talker", "vocoder")] == [
        "".join(x.capitalize() for x in g) for g in groups for _ in g
    ]


def test_build_app_refuses_unknown_arguments():
    from omni.serve.app import build_app

    with pytest.raises(ConfigError, match="build_app arguments: modle: unknown field"):
        build_app({"modle": "tiny"})
    with pytest.raises(FileNotFoundError, match="no serve config 'nope'"):
        build_app({"model": "tiny", "config": "nope"})


def test_media_cache_bytes_reaches_the_servers_conversion(tmp_path):
    """The config key sizes the decoded-media cache the server converts requests with (serve/api/media_cache.py)."""
    from omni.serve.api.server import _Routes
    from omni.serve.cluster.builder import AppArgs, server_settings

    path = tmp_path / "c.yaml"
    path.write_text("media_cache_bytes: 12345\n")
    settings = server_settings(load_serve_config(str(path)), AppArgs(), "tiny")
    assert settings.media_cache_bytes == 12345

    class Backend:
        model_name, voices, max_model_len = "tiny", ["Chelsie"], 32768

    routes = _Routes(Backend(), settings, metrics=None)
    assert routes.convert_options.media_cache.max_bytes == 12345
    path.write_text("media_cache_bytes: -1\n")
    with pytest.raises(ConfigError, match="media_cache_bytes"):
        load_serve_config(str(path))
