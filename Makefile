# dka — one-command setup, tests, the DVC pipeline and the benchmarks.
#   make test    create .venv (pinned deps), install dka editable, run pytest + nbval (smoke profile)
#   make repro   dvc repro at the profile named in params.yaml (default: demo, CPU, < 30 min)
#   make bench   print the benchmark tables (never asserts timings)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dka-installed
TRITON := triton==3.9.0

.PHONY: setup test test-lib test-notebooks repro bench clean-venv

setup: $(STAMP)

# Rebuilt only when the pins or the package metadata change: a second `make test` skips it.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=70" wheel
	$(PY) -m pip install --quiet -r requirements.lock
	# Triton's CPU interpreter runs the fused kernel's correctness tests; GPU torch builds bring their own.
	$(PY) -m pip install --quiet --no-deps $(TRITON)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (dka)" > /dev/null
	touch $(STAMP)

test: test-lib test-notebooks

# Two test processes with one thread each: torch's default of one thread per core, times two
# processes, oversubscribes the two cores and makes small tensor ops up to ~80x slower.
test-lib: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

# Every notebook executed at the smoke profile (its parameters cell defaults); cells tagged
# `nbval-check` have their stored outputs compared, the rest only have to run without error.
test-notebooks: setup
	@if ls notebooks/*.ipynb > /dev/null 2>&1; then \
		MPLBACKEND=Agg $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env notebooks; \
	else echo "no notebooks yet"; fi

repro: setup
	$(VENV)/bin/dvc repro

bench: setup
	$(PY) bench/layers.py
	$(PY) bench/train_step.py
	$(PY) bench/dissect.py --preset smoke --quick
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) bench/kernels.py --quick; else echo "bench/kernels.py: skipped (needs a CUDA GPU)"; fi


clean-venv:
	rm -rf $(VENV)
