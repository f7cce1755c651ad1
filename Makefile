# One-command set-up: every target creates .venv first if it is missing (idempotent).
PYTHON ?= python3
# The stack: one requirements file per supported torch / fbgemm / torchrec triple.
#   cpu       torch 2.13.0 + fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0 (the default; a CPU wheel, about 1.3 GB)
#   cpu-2.14  torch 2.14.1 + fbgemm-gpu-cpu 1.9.0 + torchrec 1.9.2 (PyPI's torch 2.14 is a CUDA build, about 5.8 GB)
#   gpu       torch 2.14.1 + fbgemm-gpu 1.9.0 (CUDA) + torchrec 1.9.2
# Each stack has its own environment (.venv for the default, .venv-STACK otherwise), so two can sit side by side:
# `make test STACK=cpu-2.14` creates and tests the second one.
STACK ?= cpu
ifeq ($(STACK),cpu)
VENV := .venv
else
VENV := .venv-$(STACK)
endif
ifeq ($(wildcard requirements/$(STACK).txt),)
$(error unknown STACK=$(STACK): choose one of $(basename $(notdir $(wildcard requirements/*.txt))))
endif
PY := $(VENV)/bin/python
# torchx launches `torchrun` through bash: the venv's bin must be on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
STAMP := $(VENV)/.installed-$(STACK)

.PHONY: venv test train clean-venv

# `make train`: a multi-embedding DCNv2 (4 sets) on the built-in synthetic click log, 2 local ranks through torchx.
# The recipe is one pass over 1.6M fresh rows with the LR decaying linearly to 0 (measured: test AUC within 0.02 of
# the Bayes-optimal AUC in about 5 minutes on 2 cores; a second pass over the same rows overfits).
TRAIN_ROWS ?= 2000000
TRAIN_SCALE ?= 0.001
TRAIN_DATA ?= runs/data/synth-$(TRAIN_ROWS)-$(TRAIN_SCALE)
TRAIN_MODEL ?= dcnv2-me-4x
TRAIN_EPOCHS ?= 1
TRAIN_BATCH ?= 2048
# Training steps of the run (train split = 8/10 of the rows), for the decay and three evaluations along the way.
TRAIN_STEPS = $(shell expr $(TRAIN_ROWS) \* 8 / 10 / $(TRAIN_BATCH) \* $(TRAIN_EPOCHS))
# MLP width (tests/test_first_run.py runs this recipe at a small size).
TRAIN_HIDDEN ?= 128
TRAIN_ARGS ?= -- --hidden $(TRAIN_HIDDEN) --sparse-lr 0.1 --lr 3e-3 --dropout 0 --decay-steps $(TRAIN_STEPS) \
	--eval-every $(shell expr $(TRAIN_STEPS) / 3 + 1)
# Restart budget: torchrun restarts both ranks from the newest complete checkpoint after a rank dies (0: fail).
TRAIN_MAX_RESTARTS ?= 0
# Also checkpoint every N steps (0: at evaluations only), so that a restart loses at most N steps.
TRAIN_CHECKPOINT_EVERY ?= 0
TRAIN_RUN ?= runs/$(TRAIN_MODEL)-$(shell date +%Y%m%d-%H%M%S)

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/$(STACK).txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/$(STACK).txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	test -f $(TRAIN_DATA)/metadata.json || $(VENV)/bin/multiembed synth --rows $(TRAIN_ROWS) --scale $(TRAIN_SCALE) --out $(TRAIN_DATA)
	@# One intra-op thread per rank unless OMP_NUM_THREADS is set: what torchrun picks for several ranks on a node anyway,
	@# without its four-line notice saying so.
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/torchx run -s local_cwd ./torchx_components.py:train --data $(TRAIN_DATA) --out $(TRAIN_RUN) \
		--model $(TRAIN_MODEL) --epochs $(TRAIN_EPOCHS) --batch_size $(TRAIN_BATCH) --max_restarts $(TRAIN_MAX_RESTARTS) \
		--checkpoint_every $(TRAIN_CHECKPOINT_EVERY) -j 1x2 $(TRAIN_ARGS)
	@echo "run directory: $(TRAIN_RUN)"

clean-venv:
	rm -rf $(VENV)
