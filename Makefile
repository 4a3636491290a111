# Koinon developer entry points. Everything runs from the project's own virtual environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.koinon-installed

.PHONY: venv demo up down test lint typecheck unit bench bench-deps bench-admission bench-scheduler bench-tunnel gen-proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m koinon_dev.binaries
	touch $(STAMP)

## The main job: local control plane up, one AIJob end to end, everything down again.
demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/koinon demo --example examples/numeric-job.yaml

up: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/koinon dev up

down: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/koinon dev down

## The whole suite: lint, types, then every test (tests/tunnel/test_proto_regen.py checks that
## regenerating the protocol code gives no diff).
test: venv lint typecheck
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -n 2 --dist loadgroup

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy operator workers proto examples bench tests

gen-proto: venv
	$(BIN)/python proto/gen_proto.py

bench: bench-admission bench-scheduler bench-tunnel

bench-admission: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench.admission

bench-scheduler: venv
	$(BIN)/python -m bench.scheduler

## The tunnel's baseline is OpenSSH's `ssh -L`: install it where we can (root with apt), as .ci/run does
## for the test dependencies; without it the benchmark reports ssh_error and no ratio.
bench-deps:
	@if ! command -v sshd >/dev/null 2>&1 && ! test -x /usr/sbin/sshd && command -v apt-get >/dev/null 2>&1 \
	   && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null; \
	fi

bench-tunnel: venv bench-deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench.tunnel.run

clean:
	@# The state file is the only record of a running `make up`: stop it before deleting that.
	@# Without the venv there is nothing to stop it with: say so rather than delete the record.
	@if [ -f .koinon/dev/cluster.json ]; then \
		test -x $(BIN)/koinon || { echo "a control plane is recorded in .koinon/dev: run make venv, then make clean" >&2; exit 1; }; \
		PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/koinon dev down; fi
	rm -rf .koinon build *.egg-info .mypy_cache .ruff_cache .pytest_cache
