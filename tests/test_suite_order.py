"""`make test` runs two workers over whole modules, the modules that start their own processes first."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import LONGEST_FIRST

ROOT = Path(__file__).resolve().parents[1]


def test_the_longest_modules_exist():
    """A renamed module would silently fall back to collection order."""
    assert all((ROOT / "tests" / name).is_file() for name in LONGEST_FIRST)


def test_the_longest_modules_are_collected_first(request):
    seen = list(dict.fromkeys(item.path.name for item in request.session.items))  # modules, in run order
    wanted = [name for name in LONGEST_FIRST if name in seen]
    assert seen[: len(wanted)] == wanted


def test_make_test_runs_two_workers_over_whole_modules_in_that_order():
    recipe = (ROOT / "Makefile").read_text()
    assert re.search(r"^TEST_WORKERS \?= 2$", recipe, re.M)
    assert "pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests" in recipe
    pins = (ROOT / "requirements" / "cpu.txt").read_text().split()
    assert "pytest-xdist==3.8.0" in pins and "execnet==2.1.2" in pins
