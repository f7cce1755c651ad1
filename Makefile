# One-command set-up: every target creates .venv first if it is missing (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torchx launches `torchrun` through bash: the venv's bin must be on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# CPU machines get fbgemm-gpu-cpu (requirements/cpu.txt); set STACK=gpu for the CUDA build.
STACK ?= cpu
STAMP := $(VENV)/.installed-$(STACK)

.PHONY: venv test clean-venv

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

clean-venv:
	rm -rf $(VENV)
