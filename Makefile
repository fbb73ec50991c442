# Quickstart: `make demo` (install + run the main job), `make test` (install test extras + run the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Several CPU devices so that sharded code paths run on a laptop or CI machine.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

# WordNet 3.0 (Debian wordnet-base): the source of the embedded benchmark; tests rebuild it byte for byte.
export WORDNET_DIR ?= /usr/share/wordnet

.PHONY: demo model-demo test lint install install-test lock clean

# Installs pin the tested set (constraints.txt) inside setup.cfg's ranges; `make lock` refreshes it.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg constraints.txt
	$(PIP) install -c constraints.txt -e '.[test,dev]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

DEMO_METHODS ?= fedmoe random_moe fedprox
DEMO_DIR ?= runs/demo

# The main job: FedMoE vs randomMoE vs FedProx at CPU scale (Standard-Hetero-T, shipped data), then the
# trivial baselines of the same data (the floor) and the report: Table 1 (a) and what it shows in plain words,
# then the full grid's plain words (the committed report) beside it.
# One CPU device (XLA_FLAGS unset): padding a 5-client cohort to 8 host devices only costs time.
demo: $(VENV)/.installed
	@for m in $(DEMO_METHODS); do \
		XLA_FLAGS= $(PY) -m fedmoe_jax.main --config=configs/demo.py:$$m --workdir=$(DEMO_DIR)/$$m || exit $$?; \
	done
	@$(PY) experiments/baselines.py --config=configs/demo.py --out=$(DEMO_DIR)/floor > /dev/null
	@$(PY) experiments/report.py $(DEMO_DIR) --out=$(DEMO_DIR)/report --baseline-methods=random_moe,fedprox \
		--floor=$(DEMO_DIR)/floor
	@awk '/^### \(a\)/{p=1; print; next} p&&/^##/{exit} p' $(DEMO_DIR)/report/report.md
	@awk '/^## In plain words/{p=1; next} p&&/^##/{exit} p&&NF' $(DEMO_DIR)/report/report.md
	@echo; echo "Beside it, the full CPU-scale grid (configs/cpu.py: 2x the rounds, 1.5x the local steps;" \
		"results/cpu_reproduction/README.md), so far" \
		"$$(awk 'NR==3{sub(/ under [^:]*:/, ":"); sub(/\. .*/, "."); print}' results/cpu_reproduction/report/report.md)"
	@awk '/^## In plain words/{p=1; next} p&&/^##/{exit} p&&NF' results/cpu_reproduction/report/report.md
	@echo "Report: $(DEMO_DIR)/report/report.md; figures: $(DEMO_DIR)/report/figures/;" \
		"per-round logs: $(DEMO_DIR)/<method>/metrics.jsonl (TensorBoard: $(DEMO_DIR)/<method>/tensorboard)"

model-demo: $(VENV)/.installed
	$(PY) experiments/model_demo.py --workdir=runs/model_demo

$(WORDNET_DIR)/data.noun:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null; \
	else echo "the tests need WordNet 3.0: sudo apt-get install wordnet-base (or set WORDNET_DIR)"; exit 2; fi

test: $(VENV)/.installed-test $(WORDNET_DIR)/data.noun
	$(PY) -m ruff check fedmoe_jax tests experiments configs
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

lint: $(VENV)/.installed-test
	$(PY) -m ruff check fedmoe_jax tests experiments configs

# A fresh environment from setup.cfg's ranges alone, frozen into constraints.txt (then: make test).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip --disable-pip-version-check -q install -e '.[test,dev]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable \
		| sed 's/+cpu$$//'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache build *.egg-info
