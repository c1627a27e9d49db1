"""Kernel time by name and by class (matmul, attention, other) from torch.profiler traces and profiles.

The benchmarks that name the kernel behind a gap read it here: profile_tower from a profile it
runs in its own process, bench_vs_vllm --kernels from the trace files vLLM's engine writes
(profiler_config torch, `LLM.start_profile()` / `stop_profile()`), engine core process included.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

# attention first: FlashAttention 3's kernels are CUTLASS kernels too
CLASSES = (("attention", re.compile(r"flash|fmha|attn|attention|sdpa|softmax", re.I)),
           ("matmul", re.compile(r"gemm|matmul|cutlass|xmma|cublas|sm90_|nvjet|aten::(add)?mm\b|aten::linear", re.I)))
LABELS = ("matmul", "attention", "other")


def kernel_class(name: str) -> str:
    """matmul, attention or other, by the kernel's name."""
    return next((label for label, pattern in CLASSES if pattern.search(name)), "other")


def trace_totals(folder: str | Path) -> dict:
    """Summed duration (ms) and calls per name over the torch.profiler traces in folder: GPU kernels
    when the traces have any ("kernel"), else CPU ops ("cpu_op", nested ones counted again)."""
    events = []
    for path in sorted(Path(folder).rglob("*.pt.trace.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events.extend(e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X")
    kind = "kernel" if any(e.get("cat") == "kernel" for e in events) else "cpu_op"
    by_name: dict[str, dict] = {}
    for e in events:
        if e.get("cat") == kind:
            row = by_name.setdefault(e["name"][:160], {"ms": 0.0, "calls": 0})
            row["ms"] += e.get("dur", 0) / 1000
            row["calls"] += 1
    return {"timed": kind, "by_name": by_name}


def by_class(by_name: dict[str, dict], per: int, top: int = 15) -> dict:
    """Milliseconds per unit (per image, per step: `per` of them) by class, and the top kernels."""
    classes = dict.fromkeys(LABELS, 0.0)
    for name, row in by_name.items():
        classes[kernel_class(name)] += row["ms"]
    ordered = sorted(by_name.items(), key=lambda item: -item[1]["ms"])[:top]
    return {"ms_per_unit": {label: round(ms / per, 4) for label, ms in classes.items()},
            "total_ms_per_unit": round(sum(classes.values()) / per, 4),
            "top": [{"name": name, "class": kernel_class(name), "calls": row["calls"], "ms": round(row["ms"], 3)}
                    for name, row in ordered]}


def gaps(base: dict, side: dict, key: str = "ms_per_unit", total: str = "total_ms_per_unit") -> dict:
    """What a side adds over the base per unit, by class (ms, and its share of the side's time)."""
    whole = side[total] or 1.0
    return {label: {"ms": round(ms - base[key][label], 4), "share_of_side": round((ms - base[key][label]) / whole, 4)}
            for label, ms in side[key].items()}
