#!/usr/bin/env bash
# The GPU check on a bare GPU host (torch and an older transformers preinstalled, no network, no install of omni):
#   here:  make gpu-wheels                      -> .gpu-wheels/ (carry it beside the checkout, ~19 MB)
#   there: tools/gpu_check.sh OUTDIR [serve/bench/gpu.py flags: --shape 7b|tiny --device D --stages S0,...]
# Installs the carried wheels into a temporary site (never into the image), puts it first on PYTHONPATH so the
# carried transformers shadows the image's, refuses to run on transformers < 5.24, then runs serve/bench/gpu.py as a
# plain script. OUTDIR gets gpu_check.json (rewritten after each stage) and log.txt. Exit status: the check's
# (0: every stage ran), 2: no wheels, 3: the imported transformers is too old.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [gpu.py flags]}
shift
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=${GPU_SITE:-$(mktemp -d)/site}
mkdir -p "$OUT" "$SITE"
shopt -s nullglob
whl=("$WHEELS"/*.whl)
if [ ${#whl[@]} -eq 0 ]; then
  echo "gpu_check: no wheels in $WHEELS: run 'make gpu-wheels' where there is network and carry .gpu-wheels" >&2
  exit 2
fi
if "$PY" -m pip --version >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "${whl[@]}"
else  # no pip on the host: a wheel is a zip of the site-packages tree (metadata included)
  for w in "${whl[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF' || exit 3
import sys, transformers
v = transformers.__version__
ok = tuple(int(x) for x in v.split(".")[:2]) >= (5, 24)
print(f"gpu_check: transformers {v} from {transformers.__file__}", file=sys.stderr)
if not ok:
    sys.exit(f"gpu_check: FAILED: transformers {v} < 5.24 is imported (the carried wheels do not shadow the image's)")
PYEOF
set +e
"$PY" serve/bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc; results in $OUT/gpu_check.json" >&2
exit "$rc"
