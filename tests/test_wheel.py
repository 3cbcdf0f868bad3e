"""The wheel is complete: built from the checkout, installed non-editable into a scratch directory outside it, it
finds its serve configs and sample media as package data and builds the Serve app (what a Ray cluster's
`runtime_env` pip install gets)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import omni, omni.serve.config as config, omni.assets
assert Path(omni.__file__).resolve().is_relative_to(site), omni.__file__  # the installed copy, not the checkout
assert config.CONFIG_DIR.resolve().is_relative_to(site), config.CONFIG_DIR
names = sorted(p.stem for p in config.CONFIG_DIR.glob("*.yaml"))
assert names == ["qwen2.5-omni-7b", "qwen3-omni-30b-a3b", "tiny"], names
cfg = config.load_serve_config("tiny")
assert cfg.model == "tiny" and cfg.deployments.thinker.num_cpus == 0.2
samples = omni.assets.samples_dir()
assert samples.resolve().is_relative_to(site)
assert sorted(p.name for p in samples.iterdir()) == ["clip.mp4", "image.png", "speech.wav"]

from ray.serve import Application
from omni.serve.app import build_app
assert isinstance(build_app({"model": "tiny", "config": "tiny"}), Application)
from omni.serve.cli import parser
parser().parse_args(["serve", "--config", "tiny"])
print("wheel ok")
"""


def test_wheel_installs_and_builds_the_app(tmp_path):
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(dist)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheels = list(dist.glob("omni-*.whl"))
    assert len(wheels) == 1
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(site), str(wheels[0])],
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wheel ok" in out.stdout
