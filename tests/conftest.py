"""Shared fixtures: the tiny model built once, one vLLM CPU engine per test session."""

from __future__ import annotations

import os

import pytest
import torch

from splitvlm.core.profiles import exact_cpu_isa

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The exact profile's oneDNN ISA cap (core.profiles.EXACT_CPU_ISA), set before this process runs any
# matmul: oneDNN reads it once, and in-process engines must compute as the CLI's processes do.
for _name, _value in exact_cpu_isa().items():  # importing torch runs no primitive: this is still in time
    os.environ.setdefault(_name, _value)


# Modules whose tests start their own vLLM processes, Ray clusters or servers, longest first. `make test`
# runs two workers, each taking whole modules in this order (pytest -n 2 --dist loadfile
# --no-loadscope-reorder): these start at once and the short modules fill in beside them.
LONGEST_FIRST = ("test_ray_encode.py", "test_plugin.py", "test_serve.py", "test_verify.py")


def module_rank(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=module_rank)  # stable: the order within each module, and among the rest, is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from splitvlm.tools.make_model import make_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    make_model("tiny", str(out), seed=0)
    return str(out)


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The one shared vLLM engine (exact profile) for the whole test session."""
    from splitvlm.core.config import Config
    from splitvlm.core.engine import Engine

    return Engine(Config(model=tiny_model, max_model_len=2048, show_progress=False))


@pytest.fixture()
def cli_run(engine, monkeypatch):
    """The CLI in this process, on the session's one engine: every engine it asks for is that one.
    Tests of a process's own start run the CLI in a subprocess instead."""
    from click.testing import CliRunner

    from splitvlm.cli.main import cli

    monkeypatch.setattr("splitvlm.core.engine.Engine", lambda *a, **k: engine)
    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
