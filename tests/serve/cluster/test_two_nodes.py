"""The Serve app over two Ray nodes (ray.cluster_utils.Cluster: two raylets on this machine), placed by the serve
config's custom resources alone: the ingress and the encoders on the head node ("encoders"), the Thinker, Talker and
vocoder (co-located in one replica, as tiny.yaml has them) on the other ("generators"). Requests give the in-process
pipeline's tokens; a killed encoder replica comes back on its node and the app serves the same tokens again."""

import asyncio

import httpx
import pytest
import yaml

from .conftest import start_cluster

pytestmark = pytest.mark.slow

ENCODER_NODE = {"num_cpus": 1, "resources": {"encoders": 1}}  # the head
GENERATOR_NODE = {"num_cpus": 1, "resources": {"generators": 1}}
PLACEMENT = {
    "ingress": "encoders",
    "vision_encoder": "encoders",
    "audio_encoder": "encoders",
    "thinker": "generators",
    "talker": "generators",
    "vocoder": "generators",
}
NODE_OF = {
    "Ingress": "encoders",
    "VisionEncoder": "encoders",
    "AudioEncoder": "encoders",
    "ThinkerTalkerVocoder": "generators",
}  # tiny.yaml co-locates the generating stages (colocate)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """-> (cluster, {"encoders": node id, "generators": node id}, url): the app on a two-node cluster, this process
    its driver; everything shut down after the module."""
    import ray
    from ray import serve

    from omni.serve.cluster.builder import build_app
    from omni.serve.cluster.process import free_port
    from omni.serve.config import CONFIG_DIR

    cfg = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    for section, resource in PLACEMENT.items():
        cfg["deployments"][section]["resources"] = {resource: 0.1}
    path = tmp_path_factory.mktemp("config") / "two_nodes.yaml"
    path.write_text(yaml.safe_dump(cfg))

    cluster, (_, worker) = start_cluster({**ENCODER_NODE, "include_dashboard": False}, GENERATOR_NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": "tiny", "config": str(path)}), name="omni", route_prefix="/")
        yield cluster, {"encoders": cluster.head_node.node_id, "generators": worker.node_id}, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def request_(media_dir):
    """One image + audio + speech request (every stage), greedy, bounded."""
    from omni.types import AudioPart, ChatRequest, ImagePart, Message, SamplingParams, TextPart
    from omni.encoders.media import MediaPolicy, load_audio, load_image

    policy = MediaPolicy(allowed_local_media_path=str(media_dir))
    return ChatRequest(
        [
            Message(
                "user",
                [
                    ImagePart(load_image(str(media_dir / "image.png"), policy)),
                    AudioPart(load_audio(str(media_dir / "speech.wav"), policy)),
                    TextPart("What do you see and hear?"),
                ],
            )
        ],
        sampling=SamplingParams(max_tokens=12),
        talker_sampling=SamplingParams(max_tokens=60),
        speak=True,
    )


@pytest.fixture(scope="module")
def in_process(pipeline, request_):
    return asyncio.run(pipeline.run(request_))


def _through_ray(pipeline, request_):
    from ray import serve

    from omni.serve.cluster.builder import stage_deployments
    from omni.serve.cluster.deployments import HandleStages
    from omni.serve.compose import Composition
    from omni.serve.config import load_serve_config

    cfg = load_serve_config("tiny")
    handle = lambda name: serve.get_deployment_handle(name, app_name="omni")  # noqa: E731
    named = stage_deployments(cfg)
    stages = HandleStages(
        "tiny",
        cfg,
        handle("VisionEncoder"),
        handle("AudioEncoder"),
        handle(named["thinker"]),
        handle(named["vocoder"]),
        pipeline.voices,
    )
    return asyncio.run(Composition(stages).run(request_))


def test_each_deployment_runs_on_the_node_its_resources_name(app):
    from omni.serve.cluster.replicas import list_replicas

    _, nodes, _ = app
    assert nodes["encoders"] != nodes["generators"]
    replicas = list_replicas("omni")
    assert sorted(r.deployment for r in replicas) == sorted(NODE_OF)
    for r in replicas:
        assert r.node_id == nodes[NODE_OF[r.deployment]], r


def test_two_nodes_give_the_in_process_tokens(app, pipeline, request_, in_process):
    _, _, url = app
    out = _through_ray(pipeline, request_)
    assert out.token_ids == in_process.token_ids and out.text == in_process.text
    assert out.codec_ids == in_process.codec_ids and len(out.codec_ids) > 12
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=120,
        json={"messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 8},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


def test_killed_encoder_replica_comes_back_on_its_node(app, pipeline, request_, in_process):
    from omni.serve.cluster.replicas import kill_replica, list_replicas, wait_for_new_replica

    _, nodes, _ = app
    for stage in ("VisionEncoder", "AudioEncoder"):
        [old] = list_replicas("omni", stage)
        kill_replica(old)
        new = wait_for_new_replica("omni", stage, [old.name])
        assert new.node_id == nodes["encoders"] and new.pid != old.pid
    out = _through_ray(pipeline, request_)
    assert out.token_ids == in_process.token_ids and out.codec_ids == in_process.codec_ids
