# The verbs people type. Everything a target needs (apt packages, the virtual environment) it installs itself.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3-venv python3-dev nftables iptables iproute2 util-linux curl procps systemd \
	debootstrap systemd-container lintian rpm rpmlint docker.io containerd runc
export PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

.PHONY: all deps venv demo test compat lint unit bench e2e deb rpm distributor clean

all: test

# Host packages: installed only when one is missing, so warm runs stay fast and offline.
.stamp-apt: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing host packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(BIN)/python: | .stamp-apt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.stamp-venv: setup.cfg pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

deps: .stamp-apt .stamp-venv
venv: deps

lint: deps
	$(BIN)/ruff check agent tests
	$(BIN)/ruff format --check agent tests
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest -q tests/unit

test: lint
	$(BIN)/pytest -q -p no:cacheprovider tests

# The agent on the oldest Python it supports (3.9: Amazon Linux 2023, RHEL 9), where one is installed: the unit and
# integration tests and the agent's own privileged tests, in a second virtual environment.
PYTHON39 ?= $(firstword $(wildcard /usr/bin/python3.9 /usr/local/bin/python3.9 $(HOME)/.pyenv/versions/3.9*/bin/python3.9))
VENV39 := .venv39
compat: .stamp-apt
	@if [ -z "$(PYTHON39)" ]; then echo "compat: no Python 3.9 here; set PYTHON39=/path/to/python3.9" >&2; exit 1; fi
	test -x $(VENV39)/bin/python || $(PYTHON39) -m venv $(VENV39)
	$(VENV39)/bin/pip install -q -e '.[test]'
	$(VENV39)/bin/python --version
	$(VENV39)/bin/pytest -q -p no:cacheprovider tests/unit tests/integration \
		tests/privileged/test_agent_redirect.py tests/privileged/test_policy_enforce.py

demo: deps
	$(BIN)/python -m imds_agent.sandbox.demo

# The client x upstream x mode matrix (also part of `make test`); installs the clients once into a cache.
e2e: deps
	$(BIN)/python tests/e2e/matrix.py

bench: deps
	$(BIN)/python tests/bench/forwarder.py
	$(BIN)/python tests/bench/identity.py
	$(BIN)/python tests/bench/containers.py
	$(BIN)/python tests/bench/load.py

# Packages bundle the pyroute2 the tests use (see packaging/README.md for why).
PYROUTE2_DIR = $(shell $(BIN)/python -c 'import os, pyroute2; print(os.path.dirname(os.path.dirname(pyroute2.__file__)))')

deb: deps
	packaging/deb/build.sh $(PYROUTE2_DIR) dist
	lintian --tag-display-limit 0 dist/imds-agent_*_all.deb

rpm: deps
	packaging/rpm/build.sh $(PYROUTE2_DIR) dist
	rpmlint dist/imds-agent-*.noarch.rpm || true  # remaining findings are explained in packaging/README.md

# The SSM Distributor package (manifest.json and a zip per platform family) from this version's .deb and .rpm.
distributor: deb rpm
	v=$$(sed -n 's/^__version__ = "\(.*\)"/\1/p' agent/imds_agent/__init__.py); \
	$(BIN)/python packaging/distributor/build.py --version "$$v" --out dist/distributor \
		--deb dist/imds-agent_$${v}_all.deb --rpm dist/imds-agent-$${v}-1.noarch.rpm

clean:
	rm -rf $(VENV) $(VENV39) .stamp-* build dist .cache agent/*.egg-info .mypy_cache .ruff_cache .pytest_cache
