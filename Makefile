# edgeslim — every target sets up what it needs (make setup is idempotent and fast when done).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.edgeslim-installed

# Main-job knobs (override on the command line: make demo PRESET=cpu).
PRESET ?= demo
MODEL ?= vgg16
TARGET ?= flops=0.76
METHOD ?= seed
NAME ?= $(MODEL)-$(METHOD)-$(subst =,,$(subst .,,$(TARGET)))-$(PRESET)
RUN ?= runs/$(NAME)
DIST ?= dist/$(notdir $(RUN))
REPORTS ?= reports
HOST ?=
DATA_DIR ?= $(if $(EDGESLIM_DATA),$(EDGESLIM_DATA),$(if $(wildcard ../shared/data/cifar10.npz),../shared/data,))
DATA_ARG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

.PHONY: setup system-deps demo test lint pytest compress export bench deploy report profile recalibrate clean test-board board-try

setup: $(STAMP)

# torch is pinned in the same pip command as the project so pip never pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[host,dev]"
	touch $@

# The deploy tests run a real OpenSSH server on 127.0.0.1; install it when it is missing and we may.
system-deps:
	@if ! command -v ssh >/dev/null || ! test -x /usr/sbin/sshd || ! command -v ssh-keygen >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing openssh-server/openssh-client"; \
	    (apt-get install -y -qq openssh-server openssh-client >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq openssh-server openssh-client >/dev/null)); \
	  else echo "note: openssh-server is not installed; SSH deploy tests will be skipped"; fi; \
	fi

lint: setup
	$(BIN)/ruff check compress export runtime device_bench tests benchmarks board

pytest: setup system-deps
	$(BIN)/pytest -q

test: lint pytest

# The main job: compress -> export -> bench -> report, on CIFAR-10.
demo: setup
	$(PYTHON) -m compress --model $(MODEL) --dataset cifar10 --target $(TARGET) --method $(METHOD) \
	  --preset $(PRESET) $(DATA_ARG) --out $(RUN) --force
	$(PYTHON) -m export $(RUN) --out $(DIST) --force
	$(PYTHON) -m device_bench run $(DIST) --threads 1,2 --out $(REPORTS)/$(notdir $(DIST))-local.json
	$(PYTHON) -m device_bench report $(REPORTS)/$(notdir $(DIST))-local.json --out $(REPORTS)/summary
	@echo "report: $(REPORTS)/summary/README.md"

compress: setup
	$(PYTHON) -m compress --model $(MODEL) --dataset cifar10 --target $(TARGET) --method $(METHOD) \
	  --preset $(PRESET) $(DATA_ARG) --out $(RUN)

export: setup
	$(PYTHON) -m export $(RUN) --out $(DIST)

bench: setup
	$(PYTHON) -m device_bench run $(DIST) --out $(REPORTS)/$(notdir $(DIST))-local.json

deploy: setup
	@test -n "$(HOST)" || { echo "usage: make deploy HOST=user@board [RUN=runs/NAME]"; exit 2; }
	$(PYTHON) -m device_bench remote $(DIST) --host $(HOST) --out $(REPORTS)/$(notdir $(DIST))-$(HOST).json

# The device install proven on an emulated Raspberry Pi OS base: Debian bookworm arm64 under
# qemu-user (root only). The root is built once into ~/.cache/edgeslim/board and reused (board/).
# BOARD_ARGS=--skip-if-unable: where this machine cannot, say why and exit 0 (CI).
BOARD_ARGS ?=
test-board: setup
	$(PYTHON) -m board test $(DATA_ARG) $(BOARD_ARGS)

# No board yet? Your bundle on the emulated one: deploy, run, outputs compared with this host's.
board-try: setup
	$(PYTHON) -m board try $(DIST)

report: setup
	$(PYTHON) -m device_bench report $(REPORTS)/*.json --out $(REPORTS)/summary

# A latency table for MODEL (or RUN=runs/NAME: its dense model) on HOST, or on this machine without
# HOST; written to tables/<model>-<board>.json. PROFILE_ARGS passes more (e.g. --threads 1,4).
PROFILE_ARGS ?=
profile: setup
	$(PYTHON) -m device_bench profile $(if $(filter command line,$(origin RUN)),$(RUN),$(MODEL)) \
	  $(if $(HOST),--host $(HOST),) $(PROFILE_ARGS)

# The same table's whole-network anchors timed again (the board's speed moved): TABLE=tables/....json
recalibrate: setup
	@test -n "$(TABLE)" || { echo "usage: make recalibrate TABLE=tables/MODEL-BOARD.json [HOST=user@board]"; exit 2; }
	$(PYTHON) -m device_bench profile --recalibrate $(TABLE) $(if $(HOST),--host $(HOST),) $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) .venv-device-tflite .pytest_cache .ruff_cache
