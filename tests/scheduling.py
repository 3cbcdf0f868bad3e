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

# seconds per file, setup included (a full `make test` with --durations=0, summed per file); files not named cost 0
COST_S: dict[str, float] = {}


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
