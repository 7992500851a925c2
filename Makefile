# Two commands: `make train` and `make test`. Both bootstrap .venv from .python-version's interpreter.
PYVER := $(shell cat .python-version)
PYTHON_BOOT := $(shell (pyenv prefix $(PYVER) 2>/dev/null | sed 's|$$|/bin/python|') || true)
ifeq ($(PYTHON_BOOT),)
PYTHON_BOOT := python3.12
endif
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# No TPU and no GPU here: pin JAX to the CPU. libtpu (installed by the test extra for AOT compiles) would
# otherwise probe for a TPU at start-up and log warnings. Set JAX_PLATFORMS yourself to override.
ifeq ($(wildcard /dev/accel* /dev/vfio/*)$(shell command -v nvidia-smi 2>/dev/null),)
export JAX_PLATFORMS ?= cpu
endif

.PHONY: train test bench venv clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,tf]"
	@touch $@

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train.py --config configs/tiny.yaml $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m moe.bench all --json runs/bench.json

clean:
	rm -rf $(VENV) runs
