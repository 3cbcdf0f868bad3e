# Each target installs what it needs (Debian packages, then a virtualenv with the project) and runs:
#   make serve  the OpenAI-compatible Serve app on the tiny default (127.0.0.1:8000)
#   make test   every test (.ci/run calls this, after make lint)
#   make lint   ruff check, ruff format --check, mypy (pyproject's [tool.ruff] and [tool.mypy])
#   make format ruff's safe fixes (import order, annotations) and ruff format: what make lint then finds clean
#   make run    a one-shot demo: omni chat on the bundled sample media, writes out/answer.wav
#   make gpu-wheels  the wheels the GPU check carries to a bare GPU host (.gpu-wheels/; see tools/gpu_check.sh)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEBS    := ffmpeg espeak-ng
DEBS    += chromium chromium-driver  # the demo's browser test (headless Chromium through Selenium)
PYTEST_ARGS ?=
# Python caches compiled modules (__pycache__) unless PYTHONDONTWRITEBYTECODE is set, as it is on our CI machine; then
# every process of the suite (each Ray worker, each CLI run) compiled torch's, transformers' and scipy's sources again
# (librosa's first load: 7.9 s uncached, 4.7 s cached). The recipes run without it: the first import writes the cache.
unexport PYTHONDONTWRITEBYTECODE
# pytest-xdist workers: each takes whole test files, so a module's shared server or Serve app is built once
TEST_WORKERS ?= 2
# where the `serial` tests live (tests/test_tooling.py checks that no other file has one): the second run collects
# only this folder instead of importing every test module again
SERIAL_TESTS ?= tests/serve/cluster

GPU_WHEELS ?= .gpu-wheels
# the bare GPU host's Python (the binary wheels are picked for it)
GPU_PY      ?= 3.12

.PHONY: setup debs venv links run serve test lint format bench gpu-wheels clean

setup: debs venv links

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)

# (re)installed whenever pyproject.toml changes (new dependencies, new extras). With uv (installed into the venv
# first): the same versions as pip resolves (compared with `pip freeze`), in 40 s from a cold cache and 11 s from a
# warm one instead of pip's 250 s on the 2-core machine, where torch's CUDA wheels are 4 GB to unpack: a clean clone's
# CI run starts its tests ~4 minutes sooner. pip when uv cannot be had or fails.
EXTRAS := .[test,demo,lint,webrtc]
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "$(BIN)/uv pip install -e \"$(EXTRAS)\""; \
	if ! ($(BIN)/pip install -q --disable-pip-version-check uv >/dev/null 2>&1 && \
	      $(BIN)/uv pip install -q --python $(BIN)/python -e "$(EXTRAS)"); then \
	  echo "no uv, or it failed (uv reads no pip.conf: a pip-only index?): $(BIN)/pip install -e \"$(EXTRAS)\""; \
	  $(BIN)/pip install -q --no-compile --disable-pip-version-check -e "$(EXTRAS)" 2>&1 | grep -v "^WARNING: Location" || true; \
	fi
	@$(BIN)/python -c "import omni, openai, hypothesis, torch, transformers, ray, gradio, selenium, mypy"
	@$(BIN)/ruff --version >/dev/null
	@touch $@

venv: $(VENV)/.installed

# omni/encoders -> ../encoders, ... (gitignored): the import names as folders, so that tools which follow an import to
# a file (mypy, pyright, editors) find omni.serve.config in omni/serve/config.py = serve/config.py. pyproject's
# package-dir mapping serves the runtime (the editable install's import hook, the wheel); a static tool cannot run
# that hook. The runtime finds the same files through the links.
LINKS := encoders decoders serve configs assets demos
links:
	@for d in $(LINKS); do \
	  if [ -e omni/$$d ] && [ ! -L omni/$$d ]; then echo "omni/$$d exists and is not a link to ../$$d" >&2; exit 1; fi; \
	  [ "$$(readlink omni/$$d)" = "../$$d" ] || ln -sfn ../$$d omni/$$d; \
	done

run: setup
	mkdir -p out
	$(BIN)/omni chat --model tiny --image assets/samples/image.png --audio assets/samples/speech.wav \
	  --video assets/samples/clip.mp4 --max-tokens 24 --max-speech-tokens 200 --speak out/answer.wav "What do you see and hear?"

serve: setup
	$(BIN)/omni serve --model tiny

# every check runs, then the target fails if any did
lint: setup
	@rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/ruff format --check --output-format concise . || rc=1; \
	$(BIN)/mypy || rc=1; \
	exit $$rc

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# -q prints the skip count in the summary line, -rs each skip's reason (the gpu tests where no CUDA device is present)
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs -m serial $(SERIAL_TESTS) $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: none selected

bench: setup
	$(BIN)/omni bench --model tiny,tiny-qwen3

# Downloads only (no install here): pure-Python wheels plus the few abi3/cp312 ones, for manylinux x86_64.
gpu-wheels: | $(BIN)/python
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  -r tools/gpu_wheels.txt -d $(GPU_WHEELS)
	@du -sh $(GPU_WHEELS); ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
