# Quickstart targets. Both create .venv with the Python given by PY (3.11+), install the package, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo demo-one lianet-demo test lint install clean-demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is left unpinned on purpose: PyPI's build (CUDA-enabled, runs on CPU) matches PyPI's torchvision.
# --no-cache-dir: the CUDA wheels are several GB; a copy in the wheel cache would add to the disk the install needs.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q --no-cache-dir -e ".[test]"
	# natten (neighborhood attention, DUNIA) compiles against the installed torch: no build isolation
	$(PIP) install -q --no-cache-dir --no-build-isolation "natten>=0.17"
	touch $@

install: $(VENV)/.installed

## demo: install, write the demo world's PASTIS region if absent, then a side-by-side sweep under one protocol
## (LIANet-Modified pretrained + head, DUNIA-tiny, UNet, Micro UNet on LIANet's samples; CPU profiles) and print
## its leaderboard (benchmarks/sweeps/demo.yaml; runs/sweeps/demo/results/)
demo: $(VENV)/.installed
	$(BIN)/eoplugins synth --out data/demo --size demo --products s2_tiles s1_tiles pastis
	$(BIN)/eoplugins sweep benchmarks/sweeps/demo.yaml --no-mlflow --show

## demo-one: install, write the demo world if absent, train + test one config (DEMO_CONFIG) vs the majority class
DEMO_CONFIG ?= configs/micro_unet_pastis.yaml
demo-one: $(VENV)/.installed
	$(BIN)/eoplugins demo --config $(DEMO_CONFIG) --data-dir data/demo --size demo

## lianet-demo: install, write the demo world if absent, pretrain LIANet on its S2 tiles, fine-tune + test on demo PASTIS
lianet-demo: $(VENV)/.installed
	$(BIN)/eoplugins lianet-demo --data-dir data/demo

## lint: install, then check the code with ruff (rules in pyproject.toml [tool.ruff]; .ci/run calls it before the tests)
lint: $(VENV)/.installed
	$(BIN)/ruff check terratorch_eoplugins tests benchmarks

## test: install, then run the whole test suite (what .ci/run calls); PYTEST_ARGS adds pytest options
PYTEST_ARGS ?=
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean-demo:
	rm -rf data/demo runs
