# Quickstart: `make demo` (install + run the main job), `make test` (install test extras + run the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Several CPU devices so that sharded code paths run on a laptop or CI machine.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

# WordNet 3.0 (Debian wordnet-base): the source of the embedded benchmark; tests rebuild it byte for byte.
export WORDNET_DIR ?= /usr/share/wordnet

.PHONY: demo test lint install install-test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg
	$(PIP) install -e '.[test,dev]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) experiments/model_demo.py --workdir=runs/model_demo

$(WORDNET_DIR)/data.noun:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null; \
	else echo "the tests need WordNet 3.0: sudo apt-get install wordnet-base (or set WORDNET_DIR)"; exit 2; fi

test: $(VENV)/.installed-test $(WORDNET_DIR)/data.noun
	$(PY) -m ruff check fedmoe_jax tests experiments configs
	$(PY) -m pytest -q -n 2

lint: $(VENV)/.installed-test
	$(PY) -m ruff check fedmoe_jax tests experiments configs

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache build *.egg-info
