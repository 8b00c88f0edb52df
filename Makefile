# The two set-up commands (README): `make serve` and `make test`. Both create/refresh .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
SPECTRA_DATA_DIR ?= ./data

.PHONY: serve test lint bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first so pip takes the local CPU build instead of resolving
# a newer release with several GB of CUDA packages.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/spectra serve --data-dir $(SPECTRA_DATA_DIR)

test: $(STAMP)
	@command -v promtool >/dev/null 2>&1 || bash .ci/install-prometheus
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/spectral_apply.py

clean:
	rm -rf $(VENV) build *.egg-info
