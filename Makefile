# Two commands: `make train` and `make test`. Both bootstrap .venv from .python-version's interpreter.
PYVER := $(shell cat .python-version)
PYTHON_BOOT := $(shell (pyenv prefix $(PYVER) 2>/dev/null | sed 's|$$|/bin/python|') || true)
ifeq ($(PYTHON_BOOT),)
PYTHON_BOOT := python3.12
endif
VENV := .venv
PY := $(VENV)/bin/python
# The interop tests' reference: transformers with torch, in a second environment (tests/test_hf.py). torch has
# a CPU wheel here only for Python 3.11 (any other torch request downloads a multi-GB CUDA build).
HF_PYVER := 3.11.7
HF_PYTHON_BOOT := $(shell (pyenv prefix $(HF_PYVER) 2>/dev/null | sed 's|$$|/bin/python|') || command -v python3.11)
HF_VENV := .venv-hf
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

$(HF_VENV)/.installed: Makefile
	@test -n "$(HF_PYTHON_BOOT)" || { echo "make test: Python $(HF_PYVER) is needed for the transformers reference (pyenv install $(HF_PYVER))"; exit 2; }
	@test -x $(HF_VENV)/bin/python || $(HF_PYTHON_BOOT) -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install -q --upgrade pip
	$(HF_VENV)/bin/python -m pip install -q torch==2.13.0
	$(HF_VENV)/bin/python -m pip install -q "transformers>=5.24,<6" safetensors tokenizers sentencepiece numpy
	@touch $@

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train.py --config configs/tiny.yaml $(ARGS)

test: $(VENV)/.installed $(HF_VENV)/.installed
	$(PY) -m pytest tests $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m moe.bench all --json runs/bench.json

clean:
	rm -rf $(VENV) $(HF_VENV) runs
