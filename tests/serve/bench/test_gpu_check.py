"""The GPU check (serve/bench/gpu.py) as a bare GPU host runs it, dry-run on the CPU with the tiny shape: a plain
script from the checkout (the editable install's finder removed, so omni.decoders / omni.serve resolve through the
script's own path setup), with ray, av, pydantic, librosa and soundfile missing, and yaml refused to every omni module
(transformers' huggingface_hub imports yaml itself: tools/gpu_check.sh carries the pyyaml wheel for it). Every stage
must succeed; the one import that may fail is omni.serve.pipeline (its config needs pydantic and yaml), which the
check records and works around by driving the stage classes directly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BLOCKED = ("ray", "av", "pydantic", "librosa", "soundfile")

PRELUDE = f"""
import builtins, runpy, sys
for m in {BLOCKED!r}:
    sys.modules[m] = None  # not installed on the host
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
_import = builtins.__import__

def _guarded(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__") or ""
    if level == 0 and name.split(".")[0] in {BLOCKED + ("yaml",)!r} and importer.split(".")[0] in ("omni", "__main__"):
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked for {{importer}}: a bare GPU host)", name=name)
    return _import(name, globals, locals, fromlist, level)

builtins.__import__ = _guarded
sys.argv = ["serve/bench/gpu.py"] + sys.argv[1:]
runpy.run_path("serve/bench/gpu.py", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_check_runs_on_a_bare_host_without_pydantic_av_yaml(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE, "--shape", "tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "HOME": str(Path.home()),
        },
    )
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["S0", "S1", "S2", "S3", "S4", "S5"], proc.stderr[-3000:]
    for name, rec in stages.items():
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("traceback"), proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    imports = stages["S0"]["imports"]
    assert all(v == "ok" for k, v in imports.items() if k != "omni.serve.pipeline"), imports
    assert imports["omni.serve.pipeline"] != "ok"  # documented: serve/config.py needs pydantic and yaml
    assert "pydantic" in stages["S5"]["pipeline_import"] or "yaml" in stages["S5"]["pipeline_import"]
    s3 = stages["S3"]
    assert [c["batch"] for c in s3["cells"]] == [1, 2] and all(c["step_ms_median"] > 0 for c in s3["cells"])
    assert s3["admission"]["batch"] == 2 and s3["admission"]["admit_step_ms"] > 0
    assert [t["batch"] for t in stages["S4"]["talker"]] == [1, 2] and len(stages["S4"]["dit"]) == 2
    levels = stages["S5"]["levels"]
    assert [lv["c"] for lv in levels] == [1, 2] and all(lv["ttfap_ms_p50"] > 0 for lv in levels)
    assert all(r["audio_s"] > 0 for lv in levels for r in lv["requests"])
    assert set(report["goals"]) == {"decode_b1_vs_roofline", "decode_bmax_vs_b1", "ttfap_c1", "ttfap_c2"}
    assert report["goals"]["decode_b1_vs_roofline"]["value"] is None  # no HBM bandwidth on a CPU: bytes only
