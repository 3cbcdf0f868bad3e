"""How `make test` spreads the suite over its pytest-xdist workers (a pytest plugin, loaded by tests/conftest.py).

`--dist loadfile` keeps a file's tests on one worker (its module-scoped servers start once), but it hands the files out
largest-count first, so the few slow files (a Ray Serve app or a browser to start, one to four minutes each here) came
last and one worker ran them while the other sat idle. Here, with `--dist loadfile`:
- the files that share one `omni serve` (SHARED_SERVER_FILES: conftest.SharedServer) form one unit, run in order on one
  worker: one server start instead of one per worker that happens to get one of them;
- units are handed out longest first (COST_S: measured seconds per file on the 2-core machine, `--durations=0` of a
  full run summed per file; a file not named costs 0 and keeps its collection order), so the run ends on short ones.
"""

from __future__ import annotations

import pytest

# files whose tests use the shared tiny server (tests/serve/cluster/conftest.py tiny_app), in the order they run: the
# last one stops it
SHARED_SERVER_FILES = (
    "tests/serve/cluster/test_app.py",
    "tests/serve/cluster/test_app_clients.py",
    "tests/serve/cluster/test_app_encoder_cache.py",
    "tests/serve/cluster/test_app_shutdown.py",
)
SHARED_SERVER_UNIT = "tiny-app-server"

# seconds per file, setup included: a full `make test` with --durations=0 --durations-min=3, summed per file
# (2026-12-07, 2-core machine under other load: read them as ratios); files not named cost 0 and run last
COST_S: dict[str, float] = {
    "tests/serve/cluster/test_caption.py": 660,  # with the caption bench's run (136)
    "tests/demos/test_gradio_app.py": 365,
    "tests/serve/cluster/test_app.py": 160,  # with test_app_clients: the shared server's unit
    "tests/serve/cluster/test_app_clients.py": 100,
    "tests/serve/cluster/test_two_nodes.py": 240,
    "tests/decoders/test_token2wav.py": 239,
    "tests/serve/cluster/test_qwen3_app.py": 208,
    "tests/serve/cluster/test_caption_cluster.py": 204,
    "tests/encoders/test_media_oracle.py": 96,
    "tests/serve/bench/test_bench_qwen3.py": 94,
    "tests/serve/bench/test_gpu_check.py": 80,
    "tests/serve/bench/test_bench.py": 79,
    "tests/serve/api/test_fuzz.py": 46,
    "tests/demos/test_live_voice.py": 45,
    "tests/serve/api/test_realtime_webrtc.py": 40,
    "tests/omni/test_talker_qwen3.py": 38,
    "tests/omni/test_engine_kv.py": 32,
    "tests/serve/api/test_http_qwen3.py": 31,
    "tests/serve/api/test_speech.py": 30,
    "tests/test_wheel.py": 27,
    "tests/serve/api/test_realtime.py": 25,
    "tests/serve/cluster/test_app_shutdown.py": 24,
}


def unit_of(path: str) -> str:
    return SHARED_SERVER_UNIT if path in SHARED_SERVER_FILES else path


def unit_cost(unit: str) -> float:
    if unit == SHARED_SERVER_UNIT:
        return sum(COST_S.get(p, 0.0) for p in SHARED_SERVER_FILES)
    return COST_S.get(unit, 0.0)


def order_items(items: list) -> None:
    """Sort in place: the units longest first; a unit's tests stay together in their collection order (its files in
    SHARED_SERVER_FILES order). The sort is stable, so equal costs keep the collection order."""
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(unit_of(item.nodeid.split("::", 1)[0]), i)

    def key(pair):
        i, item = pair
        path = item.nodeid.split("::", 1)[0]
        unit = unit_of(path)
        within = SHARED_SERVER_FILES.index(path) if unit == SHARED_SERVER_UNIT else 0
        return (-unit_cost(unit), first_seen[unit], within, i)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    order_items(items)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        """loadfile with the shared-server files as one unit, handed out in collection order (order_items)."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep order_items' order (xdist would sort by test count)
    return UnitScheduling(config, log)
