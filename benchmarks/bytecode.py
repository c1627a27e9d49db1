"""Byte-compile the packages vLLM is loaded from, as `pip install` does, before anything is timed.

pip compiles every installed .py file to .pyc at install time; the GPU bundle (../shared/gpu) is
unpacked instead, so the first process that imports vLLM on a fresh machine compiles the
bundle's modules itself, and in the GPU check that process is the timed encode (20 s limit from
start to first entry). benchmarks/cold_import.py measures what that costs; on the 2-core CPU
machine (benchmarks/results/cold_import_cpu.json) the imports an engine start begins with took
9.9-10.7 s from the bundle's packages without bytecode and 8.4-9.3 s compiled. So the check
compiles first, as a step of its own, and records what it found.

python -m benchmarks.bytecode [PACKAGE ...]   (default: vllm) prints what it found and did as JSON.
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def site_of(package: str) -> Path | None:
    """The directory the package was installed into (its parent), or None where it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def without_bytecode(root: Path) -> tuple[int, list[Path]]:
    """(.py files under root, those with no .pyc for this interpreter)."""
    files, missing = 0, []
    for path in root.rglob("*.py"):
        files += 1
        if not Path(importlib.util.cache_from_source(str(path))).exists():
            missing.append(path)
    return files, missing


def compile_site(package: str = "vllm") -> dict:
    """Compile the files without bytecode in the site the package was installed into (all of it, as
    pip's install would have), in parallel; a file that does not compile is counted and left."""
    site = site_of(package)
    if site is None:
        return {"package": package, "installed": False}
    files, missing = without_bytecode(site)
    t0 = time.perf_counter()
    done = compile_files(missing)
    return {"package": package, "site": str(site), "py_files": files, "without_bytecode": len(missing),
            "compiled": sum(done), "failed": len(done) - sum(done), "seconds": round(time.perf_counter() - t0, 2)}


def compile_files(paths: list[Path]) -> list[bool]:
    """Byte-compile each file, in parallel across the CPUs; whether each compiled."""
    if not paths:
        return []
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_compile, paths, chunksize=64))


def _compile(path: Path) -> bool:
    return bool(compileall.compile_file(str(path), quiet=2))


if __name__ == "__main__":
    print(json.dumps([compile_site(p) for p in sys.argv[1:] or ["vllm"]], indent=2))
