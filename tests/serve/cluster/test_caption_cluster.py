"""`omni caption` on a Ray cluster, unchanged: a three-node `ray.cluster_utils.Cluster` on this machine (a head with no
CPUs for actors, a node with the custom resource `encoders`, a node with `thinker`), reached through RAY_ADDRESS as a
user's cluster is. The encoder actors run on the one node and the Thinker actors on the other, and the rows are the
single-node rows (the official generate's captions, the same error rows)."""

import json

import pytest

from omni.serve.cluster.caption import CaptionOptions, run_caption

from .conftest import MAX_TOKENS, MIXED, check_rows, start_cluster

pytestmark = pytest.mark.slow
NAMES = {
    k: MIXED[k]
    for k in ("image.png", "speech.wav", "clip.mp4", "corrupt.png", "truncated.mp4", "empty.wav", "notes.txt")
}


@pytest.fixture(scope="module")
def cluster():
    store = 256 * 2**20  # object store per node: the rows are small
    c, (_, enc, thk) = start_cluster(
        {"num_cpus": 1, "object_store_memory": store},
        {"num_cpus": 1, "resources": {"encoders": 1}, "object_store_memory": store},
        {"num_cpus": 1, "resources": {"thinker": 1}, "object_store_memory": store},
    )
    c.wait_for_nodes()
    yield c, enc.node_id, thk.node_id
    c.shutdown()


def test_stages_on_their_nodes_give_the_single_node_rows(cluster, mixed_dir, tmp_path, oracle, monkeypatch):
    c, enc_node, thinker_node = cluster
    monkeypatch.setenv("RAY_ADDRESS", c.address)  # what a user does: the job connects to it (and disconnects after)
    folder = tmp_path / "media"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes((mixed_dir / name).read_bytes())
    out = tmp_path / "captions.jsonl"
    opts = CaptionOptions(
        max_tokens=MAX_TOKENS, batch_size=4, encoder_resources={"encoders": 0.5}, thinker_resources={"thinker": 0.5}
    )
    report = run_caption([str(folder)], str(out), opts)
    assert report.nodes["encode"] == [enc_node] and report.nodes["thinker"] == [thinker_node]
    assert enc_node != thinker_node
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    check_rows(rows, folder, oracle, names=NAMES)
    assert (report.ok, report.failed) == (3, 4)
