# The two set-up commands (README): `make serve` and `make test`. Both create/refresh .venv with exactly
# the packages of requirements.lock (versions and hashes); nothing is resolved at install time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
NODEPS_LOCK := requirements-nodeps.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) $(NODEPS_LOCK) | cksum | cut -d' ' -f1)
SPECTRA_DATA_DIR ?= ./data

.PHONY: serve test lint lock bench gpu-wheels venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The lock pins torch==2.13.0+cpu, the local CPU wheel pip finds on these machines, so no CUDA package
# comes in. pip-sync (pip-tools, itself locked) then removes whatever an older lock left behind, and the
# project goes in editable without build isolation: its build backend (setuptools) is in the lock too.
$(STAMP): pyproject.toml $(LOCK) $(NODEPS_LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK) -r $(NODEPS_LOCK)
	$(BIN)/pip-sync --quiet --no-config $(LOCK) $(NODEPS_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --editable .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/spectra serve --data-dir $(SPECTRA_DATA_DIR)

test: $(STAMP)
	@command -v promtool >/dev/null 2>&1 || bash .ci/install-prometheus
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || bash .ci/install-postgres
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Refresh the lock on purpose (new dependency, range change, security update): every package moves to the
# newest release pyproject.toml allows. Options are in pyproject.toml's [tool.pip-tools].
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --upgrade pyproject.toml
	@grep -q '^torch==2.13.0+cpu ' $(LOCK) || { echo "$(LOCK): torch is not the local CPU build 2.13.0+cpu" >&2; exit 1; }
	@! grep -qiE '^nvidia-|^triton==' $(LOCK) || { echo "$(LOCK): CUDA packages crept in" >&2; exit 1; }

bench: $(STAMP)
	$(BIN)/python bench/spectral_apply.py

# The GPU machine has torch, transformers and peft but not the settings model's packages or llguidance (the
# engine's grammar masks), and no registry:
# bench/gpu_suite.py carries these wheels (the lock's versions, for its Python 3.12) in .whl.
EXCLUDE = $(shell git rev-parse --git-path info/exclude)
GPU_WHEELS := pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv llguidance
gpu-wheels: $(STAMP)
	grep -qx '/.whl/' $(EXCLUDE) 2>/dev/null || echo /.whl/ >> $(EXCLUDE)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$(foreach name,$(GPU_WHEELS),$(shell grep -oiE '^$(name)==[^ ]+' $(LOCK)))

clean:
	rm -rf $(VENV) build *.egg-info
