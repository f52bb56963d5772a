# The two commands of the README:
#   make run    set up everything, then open napari with the plugin, a real sample CT and the
#               bundled weights (headless machines: the same job from the command line)
#   make test   set up everything (Xvfb + Mesa included), then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup system-deps lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; a looser
	@# request would pull a multi-GB CUDA build from PyPI.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# napari needs a real OpenGL context: Xvfb + Mesa, from Debian, installed only when missing.
system-deps:
	@bash scripts/install-system-deps.sh

run: setup
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
		$(PY) -m napari_langmamba.demo; \
	else \
		echo "No display found (DISPLAY is unset): running the headless main job instead."; \
		$(VENV)/bin/napari-langmamba demo; \
	fi

test: system-deps setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done

clean-venv:
	rm -rf $(VENV)
