# kdseg: the two set-up commands are `make fit` and `make test`; each creates .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KDSEG := $(VENV)/bin/kdseg
STAMP := $(VENV)/.installed-stamp
# The run of `make fit`: a stack of config layers (experiments/README.md), later ones win.
CONFIG ?= experiments/data/phantom_semi.yaml experiments/methods/mean_teacher.yaml \
          experiments/budgets/phantom.yaml experiments/budgets/phantom/mean_teacher.yaml
PYTEST_ARGS ?=

.PHONY: install fit test test-slow mutation bench gpu-check action-chain reproduce-table clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Trains the default stack (Mean Teacher) on the built-in phantom (no data needed) and prints
# validation Dice; another run: make fit CONFIG="<its layers from experiments/stacks.yaml>".
fit: $(STAMP)
	$(KDSEG) fit $(addprefix --config=,$(CONFIG)) --trainer.enable_progress_bar=false

# The test suite (long runs are behind the `slow` marker: `make test-slow`).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

# Mutation testing of the losses and the methods' training steps ([tool.mutmut] in pyproject.toml;
# not part of `make test`). mutmut works in mutants/; MUTMUT_ARGS narrows it, e.g.
#   make mutation MUTMUT_ARGS='kdseg.losses.*'      or      MUTMUT_ARGS='kdseg.methods.ustm.*'
MUTMUT_ARGS ?=
MUTMUT_CHILDREN ?= 2
mutation: $(STAMP)
	$(PY) -m pip install --quiet -e '.[mutation]'
	$(VENV)/bin/mutmut run --max-children $(MUTMUT_CHILDREN) $(MUTMUT_ARGS); \
	status=$$?; $(VENV)/bin/mutmut results; exit $$status

# Training-step time and peak memory of every method relative to `supervised` (CPU, and GPU if present).
bench: $(STAMP)
	$(PY) -m kdseg.bench --out experiments/results/bench

# First run on a GPU machine (meant to take under 8 min on one GPU; never run on one yet): every method's fit in 32-true and bf16-mixed
# (step time, peak GPU memory), a 2-GPU DDP fit, GPU-vs-CPU test metrics; JSON in
# experiments/results/bench/gpu-*.json. Without a GPU: the same path on CPU at tiny sizes.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(PY) -m kdseg.gpu_check $(GPU_CHECK_ARGS)

# ACTION's three stages (the matrix's entry) on ACDC with LABELED=3 or 7 patients, under PROFILE:
action-chain: $(STAMP)
	$(PY) -m kdseg.reproduce --profile $(PROFILE) --only acdc_semi_$(LABELED)/action $(REPRODUCE_ARGS)

# The results table of every method in experiments/reproduce/matrix.yaml under a budget profile:
#   make reproduce-table                 PROFILE=cpu: real data on 2 cores with JOBS=2, 39 runs (times: profiles/cpu.yaml)
#   make reproduce-table PROFILE=smoke   the built-in phantoms, minutes, no data needed
#   make reproduce-table PROFILE=paper LAUNCHER=slurm   the papers' protocols, one Slurm job (GPU) per run
#        (submitit; parameters: the profile's slurm block, or SLURM="slurm_partition=gpu timeout_min=1440")
# Runs go to runs/reproduce/$(PROFILE) (finished ones are skipped, interrupted ones resume), tables
# and figures to experiments/results/$(PROFILE). REPRODUCE_ARGS passes more options
# (--only acdc_scribble, --seeds 0, --set semi_steps=400, --max-runs 2; python -m kdseg.reproduce --help).
PROFILE ?= cpu
JOBS ?= 2
LABELED ?= 7
LAUNCHER ?= local
SLURM ?=
REPRODUCE_ARGS ?=
reproduce-table: $(STAMP)
	$(PY) -m kdseg.reproduce --profile $(PROFILE) --jobs $(JOBS) --launcher $(LAUNCHER) $(if $(SLURM),--slurm $(SLURM)) $(REPRODUCE_ARGS)

clean-venv:
	rm -rf $(VENV)
