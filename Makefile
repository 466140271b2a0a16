# Entry points: `make demo` (the pipeline on the embedded digits data), `make test`, and `make gpu-check` (on a
# CUDA machine: every stage and the evaluation on GPUs, DDP and bf16, with the speed figures; bench/gpu_check.py).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed

.PHONY: demo test gpu-check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip > /dev/null 2>&1 || $(PY) -m pip install --upgrade pip

# pip's and setuptools' own notices go to $(VENV)/install.log, shown only if the installation fails
$(DEMO_STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e . > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	touch $@

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]" > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	touch $@ $(DEMO_STAMP)

install: $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) train.py pipeline --config configs/digits.yaml --run.name demo
	$(PY) eval.py --run runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# GPU_PYTHON=python3 runs the check with a Python that already has the dependencies (a machine's own CUDA torch)
gpu-check:
	@if [ -n "$(GPU_PYTHON)" ]; then $(GPU_PYTHON) -m bench.gpu_check; else $(MAKE) -s install && $(PY) -m bench.gpu_check; fi

clean:
	rm -rf runs lightning_logs .pytest_cache
