# FedReID Edge: `make demo` and `make test` each set everything up first (venv, install, broker).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR := .demo
PYTEST_ARGS ?=

.PHONY: setup broker browser demo test bench lint format clean

setup: $(STAMP) broker browser

# Re-install only when pyproject.toml changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,cluster]'
	touch $(STAMP)

# mosquitto from Debian when it is missing and we may install it (root); otherwise say what to do.
broker:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto from Debian"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "warning: mosquitto not found; install it (e.g. sudo apt-get install mosquitto)"; \
	fi

# Headless Chromium from Debian for the dashboard's browser test (tests/cloud/test_monitoring.py), when
# missing and we may install it (root); otherwise that test skips (outside CI) and says why.
browser:
	@if command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium-headless-shell from Debian"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null; \
	else \
		echo "warning: headless Chromium not found (apt-get install chromium-headless-shell); the browser test skips"; \
	fi

# A real multi-process federation on this machine: a private mosquitto, the aggregator, and one
# edge-agent process per synthetic site, over MQTT; prints per-site rank-1/mAP and writes rounds.png.
# No pretrained weights can be downloaded here, so the network trains from scratch (lr 0.02 is stable
# from scratch; the paper's 0.05/0.005 assumes ImageNet weights, given with --pretrained PATH). It runs
# the shipped strategy: FedPav with each site's BatchNorm layers kept local (docs/algorithms.md).
demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/cloud-aggregator simulate --transport mqtt --sites 3 --synthetic-images 800 --rounds 5 \
		--algorithm fednova --arch resnet18 --height 128 --width 64 --out $(DEMO_DIR)

# Two workers (pytest-xdist): the long tests mostly wait on agent processes, brokers and deadlines, so
# two at a time take ~40 % less wall time on 2 cores. One torch thread per process: two workers of two
# OpenMP threads each on 2 cores contend and slow down many-fold. `make test PYTEST_WORKERS=0`: serial.
PYTEST_WORKERS ?= 2
TEST_THREADS := $(if $(filter 0,$(PYTEST_WORKERS)),,OMP_NUM_THREADS=1)
test: setup lint
	$(TEST_THREADS) $(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Quick versions of the six system benchmarks (docs/benchmarks.md has the full commands and numbers);
# the learning study is its own command: .venv/bin/python bench/federated.py
bench: setup
	$(BIN)/python bench/aggregate.py --repeats 3
	$(BIN)/python bench/train_loop.py --images 160 --repeats 3
	$(BIN)/python bench/transfer.py --mb 50 --repeats 2
	$(BIN)/python bench/round.py --rounds 2 --memory-sites 2 8
	$(BIN)/python bench/floods.py --seconds 4 --probes 20
	$(BIN)/python bench/inference.py --quick
	$(BIN)/python bench/encodings.py --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
