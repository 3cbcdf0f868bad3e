"""The import names resolve to the checkout's files for the tools that follow an import to a file (mypy here;
pyright and editors read the same folders), not only at run time.

pyproject maps omni.serve to serve/ (setuptools package-dir), which the runtime follows through the editable install's
import hook; no static tool runs that hook, so `make setup` links omni/serve -> ../serve, ... (the Makefile's `links`,
gitignored). These tests fail if a link is missing or points elsewhere, or if mypy stops finding a layer's module.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "encoders": "omni.encoders",
    "decoders": "omni.decoders",
    "serve": "omni.serve",
    "demos": "omni.demos",
    "configs": "omni.configs",
    "assets": "omni.assets",
}
# one module of each layer with Python in it: (import name, file in the checkout)
MODULES = [
    ("omni.serve.config", "serve/config.py"),
    ("omni.serve.api.protocol", "serve/api/protocol.py"),
    ("omni.encoders.sources", "encoders/sources.py"),
    ("omni.decoders.token2wav", "decoders/token2wav.py"),
    ("omni.demos.client", "demos/client.py"),
    ("omni.assets", "assets/__init__.py"),
]


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_each_layer_has_its_link_in_omni(folder):
    link = ROOT / "omni" / folder
    assert link.is_symlink(), f"{link} is missing: run `make setup` (the Makefile's links)"
    assert link.resolve() == ROOT / folder


def test_the_runtime_imports_the_checkout_files():
    for name, rel in MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert Path(spec.origin).resolve() == ROOT / rel, (name, spec.origin)


SNIPPET = """\
from omni.serve.config import PipelineConfig
from omni.serve.api.protocol import MAX_MESSAGES
from omni.encoders.sources import MediaLimits
from omni.decoders.token2wav import VocoderConfig
from omni.demos.client import main
from omni.assets import samples_dir

reveal_type(PipelineConfig().thinker)
reveal_type(MAX_MESSAGES)
reveal_type(samples_dir())
wrong: int = MediaLimits()
"""


@pytest.mark.slow  # ~20 s: mypy reads the project's modules and the standard library's stubs
def test_mypy_resolves_each_layer_to_its_folder(tmp_path):
    """mypy (make lint's type checker) on a file that imports one module of each layer: no import error, the types it
    reveals are the definitions' (so it read them), and the files it parsed for them are the checkout's."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    config = tmp_path / "mypy.ini"
    # the project's modules are analysed (errors in them are make lint's business: silent), third-party ones are
    # found but not analysed, which keeps this test at a few seconds
    config.write_text(
        "[mypy]\nfollow_imports = skip\nignore_missing_imports = True\n"
        "[mypy-omni.*]\nfollow_imports = silent\nignore_missing_imports = False\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(config),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--verbose",
        "--no-error-summary",
        str(snippet),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = [line for line in out.stdout.splitlines() if line.startswith(str(snippet))]
    assert not any("import" in line for line in report), out.stdout
    assert 'Revealed type is "omni.engine_config.EngineConfig"' in out.stdout, out.stdout
    assert 'Revealed type is "int"' in out.stdout, out.stdout
    assert 'Revealed type is "pathlib.Path"' in out.stdout, out.stdout
    assert 'expression has type "MediaLimits", variable has type "int"' in out.stdout, out.stdout
    assert len(report) == 4 and out.returncode == 1, out.stdout  # 3 reveals and the one wrong assignment
    parsed = dict(re.findall(r"Parsing (\S+) \((omni[\w.]*)\)", out.stderr))
    found = {name: Path(path).resolve() for path, name in parsed.items()}
    for name, rel in MODULES:
        assert found.get(name) == ROOT / rel, (name, found.get(name))


def test_make_tests_units_keep_the_shared_server_files_together_longest_first(monkeypatch):
    """tests/scheduling.py: the files of the shared `omni serve` run as one unit, in their order (the last stops the
    server); units are handed out longest first; a file's tests stay together in their order."""
    import scheduling

    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    monkeypatch.setattr(scheduling, "COST_S", {"tests/b.py": 5.0, "tests/serve/cluster/test_app.py": 2.0})
    shared = scheduling.SHARED_SERVER_FILES
    ids = ["tests/a.py::t1", f"{shared[2]}::t", "tests/b.py::t1", f"{shared[0]}::t1", "tests/a.py::t2"]
    ids += [f"{shared[1]}::t", "tests/b.py::t2", f"{shared[0]}::t2"]
    items = [Item(i) for i in ids]
    scheduling.order_items(items)
    assert [i.nodeid for i in items] == [
        "tests/b.py::t1",
        "tests/b.py::t2",
        f"{shared[0]}::t1",
        f"{shared[0]}::t2",
        f"{shared[1]}::t",
        f"{shared[2]}::t",
        "tests/a.py::t1",
        "tests/a.py::t2",
    ]
    assert {scheduling.unit_of(p) for p in shared} == {scheduling.SHARED_SERVER_UNIT}


def test_every_serial_test_is_where_make_test_runs_them():
    """make test's second run collects only SERIAL_TESTS (the Makefile's): a `serial` test elsewhere would run in
    neither run (the first deselects every serial test)."""
    folder = re.search(r"^SERIAL_TESTS \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    mark = "pytest.mark." + "serial"  # not spelled whole here: this file is searched too
    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py") if mark in p.read_text()}
    assert marked and all(p.startswith(folder + "/") for p in marked), (folder, marked)
