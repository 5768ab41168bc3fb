# dka — one-command setup, tests, the DVC pipeline and the benchmarks.
#   make test    create .venv (pinned deps), install dka editable, run pytest + nbval (smoke profile) and the
#                paper profile's dry run (make test-paper-dryrun)
#   make repro   check params.yaml, then dvc repro of the profile named there (default: demo, CPU);
#                make repro PROFILE=<name> for another profile of params.yaml (params.yaml is not edited)
#   make bench   print the benchmark tables (never asserts timings)
#   make lab     JupyterLab on the notebooks, with the project's kernel and the K sliders (LAB_ARGS=... to add options)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dka-installed
TRITON := triton==3.9.0
PROFILE ?=

.PHONY: setup test test-lib test-notebooks test-paper-dryrun repro bench lab clean-venv

setup: $(STAMP)

# Rebuilt only when the pins or the package metadata change: a second `make test` skips it.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(PY) -m pip install --quiet -r requirements.lock
	# Triton's CPU interpreter runs the fused kernel's correctness tests; GPU torch builds bring their own.
	$(PY) -m pip install --quiet --no-deps $(TRITON)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (dka)" > /dev/null
	touch $(STAMP)

test: test-lib test-notebooks test-paper-dryrun

# Two test processes with one thread each: torch's default of one thread per core, times two
# processes, oversubscribes the two cores and makes small tensor ops up to ~80x slower.
test-lib: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

# Every notebook executed at the smoke profile (its parameters-cell defaults). Notebooks are stored
# without outputs, so nothing is compared: cells tagged `nbval-check` assert deterministic invariants.
test-notebooks: setup
	@if ls notebooks/*.ipynb > /dev/null 2>&1; then \
		MPLBACKEND=Agg $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env notebooks; \
	else echo "no notebooks yet"; fi

# The paper profile's code paths at toy size (params.yaml `paper-dryrun`): tiny data in the real formats,
# the five notebooks through papermill, torchrun with 2 processes (gloo). A few minutes on 2 cores.
test-paper-dryrun: setup
	OMP_NUM_THREADS=1 $(PY) tests/paper_dryrun.py

# `make repro` = `dvc repro` of one profile's stages: the `profile:` of params.yaml, or PROFILE=<name> (any
# profile of dvc.yaml's `vars:` lists; 06 runs at `related_profiles`, e.g. PROFILE=demo-related). `python -m dka params` first checks every profile of
# params.yaml (exit 2 lists each problem; run it alone to check an edit) and prints that profile's stage
# names (`01_cifar@demo` ...; dvc.yaml defines one stage per notebook and profile), so nothing runs on a
# typo and params.yaml is never edited. Stage commands run python and papermill from the venv, hence PATH.
repro: setup
	@set -e; export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	stages=$$($(PY) -m dka params --stages $(if $(PROFILE),--profile '$(PROFILE)')); \
	dvc repro $$stages

bench: setup
	$(PY) bench/layers.py
	$(PY) bench/train_step.py
	$(PY) bench/dissect.py --preset smoke --quick
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) bench/kernels.py --quick; else echo "bench/kernels.py: skipped (needs a CUDA GPU)"; fi

# The venv's JupyterLab (ipywidgets' front-end extension ships with jupyterlab_widgets) and its kernel
# "Python 3 (dka)"; dvc and papermill on PATH for its terminals. Jupyter refuses root unless told (containers).
lab: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/01_cifar.ipynb

clean-venv:
	rm -rf $(VENV)
