"""Store throughput and latency: batched put_many and get_many, single get p50/p99, and where the time goes.

    python -m benchmarks.bench_store            # about 1 GiB per entry size
    python -m benchmarks.bench_store --smoke    # a few seconds on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import torch

from splitvlm.store import EmbeddingStore, Entry, Expect, make_key
from splitvlm.store.entry import parse_blob, tensor_checksum

RESULTS = Path(__file__).parent / "results" / "bench_store.json"
CASES = {  # name: (n_tokens, hidden); bf16 entries
    "768KiB": (256, 1536),
    "3MiB": (1024, 1536),
}
MERGE = 2


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lmdb": lmdb.__version__,
        "lmdb_lib": ".".join(map(str, lmdb.version())),
    }


def filesystem(path: Path) -> str:
    """The mount's filesystem type, from /proc/mounts (longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def make_entries(n: int, n_tokens: int, hidden: int, seed: int) -> list[Entry]:
    gen = torch.Generator().manual_seed(seed)
    side = MERGE * int(n_tokens**0.5)
    grid = torch.tensor([[1, side, n_tokens * MERGE * MERGE // side]])
    base = torch.randn(n_tokens, hidden, generator=gen).to(torch.bfloat16)
    entries = []
    for i in range(n):
        key = make_key(f"{seed}-{i}".encode(), model_fingerprint="0", preprocess={}, profile="exact", dtype="bfloat16")
        embeds = base.clone()
        embeds[0, 0] = i  # every entry distinct, without paying for n random tensors
        entries.append(Entry(key, embeds, grid, {"model_id": "bench", "source": f"bench/{i}.png"}))
    return entries


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timed_puts(store: EmbeddingStore, batches: list[list[Entry]]) -> float:
    t0 = time.perf_counter()
    for chunk in batches:
        assert store.put_many(chunk) == len(chunk)
    return time.perf_counter() - t0


def run_case(root: Path, name: str, n_tokens: int, hidden: int, total_bytes: int, batch: int, samples: int) -> dict:
    entry_bytes = n_tokens * hidden * 2
    n = max(batch, total_bytes // entry_bytes // batch * batch)
    entries = make_entries(n, n_tokens, hidden, seed=len(name))
    keys = [e.key for e in entries]
    expect = Expect(hidden_size=hidden, dtype=torch.bfloat16, merge_size=MERGE)
    store = EmbeddingStore(root / f"{name}.lmdb")
    batches = [entries[i : i + batch] for i in range(0, n, batch)]

    put_s = timed_puts(store, batches)

    for i in range(0, n, batch):  # warm the page cache
        store.get_many(keys[i : i + batch], expect)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        store.get_many(keys[i : i + batch], expect)
    get_s = time.perf_counter() - t0

    rng = random.Random(0)
    picks = [rng.choice(keys) for _ in range(samples)]
    latency, fetch_latency, check_latency = [], [], []
    for key in picks:
        t = time.perf_counter()
        store.get(key, expect)
        latency.append(time.perf_counter() - t)
    for key in picks:  # the two halves of a get: LMDB read + copy, then the checks
        t = time.perf_counter()
        ((_, blob),) = store._copies([key])
        fetch_latency.append(time.perf_counter() - t)
        t = time.perf_counter()
        parse_blob(key, blob, expect)
        check_latency.append(time.perf_counter() - t)
    t = time.perf_counter()
    for entry in entries[:batch]:
        tensor_checksum(entry.image_embeds, entry.image_grid_thw)
    checksum_s = (time.perf_counter() - t) / batch
    t = time.perf_counter()
    for entry in entries[:batch]:
        entry_bytes(entry)
    encode_s = (time.perf_counter() - t) / batch
    stats = store.stats()
    store.close()
    shutil.rmtree(root / f"{name}.lmdb")  # frees the disk (or tmpfs memory) before the next case

    mb, us = n * entry_bytes / 1e6, 1e6
    return {
        "entry": f"{n_tokens} x {hidden} bfloat16",
        "entry_bytes": entry_bytes,
        "entries": n,
        "batch": batch,
        "put_MBps": round(mb / put_s, 1),
        "put_entries_per_s": round(n / put_s, 1),
        "get_many_MBps": round(mb / get_s, 1),
        "get_many_entries_per_s": round(n / get_s, 1),
        "get_p50_us": round(pct(latency, 0.5) * us, 1),
        "get_p99_us": round(pct(latency, 0.99) * us, 1),
        "get_mean_us": round(statistics.fmean(latency) * us, 1),
        "lmdb_read_copy_p50_us": round(pct(fetch_latency, 0.5) * us, 1),
        "checks_p50_us": round(pct(check_latency, 0.5) * us, 1),
        "blake3_checksum_us": round(checksum_s * us, 1),
        "encode_per_entry_us": round(encode_s * us, 1),
        "store_file_bytes": stats["file_bytes"],
        "value_bytes": stats["bytes"],
    }


def run_all(where: str | None, total: int, samples: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=where))
    results: dict = {"dir": str(root.parent), "filesystem": filesystem(root.parent)}
    try:
        for name, (n_tokens, hidden) in CASES.items():
            batch = max(4, (48 << 20) // (n_tokens * hidden * 2))  # 48 MiB per put_many
            results[name] = run_case(root, name, n_tokens, hidden, total, batch, samples)
            print(results["filesystem"], name, json.dumps(results[name]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--gib", type=float, default=1.0, help="data written per entry size (default 1)")
    ap.add_argument("--samples", type=int, default=2000, help="single gets timed per entry size")
    ap.add_argument("--dir", default=None, help="where the stores go (default: the temporary folder)")
    ap.add_argument("--no-tmpfs", action="store_true", help="skip the second run in /dev/shm (memory, no disk)")
    ap.add_argument("--out", default=str(RESULTS), help=f"JSON results (default {RESULTS})")
    args = ap.parse_args()
    total = (24 << 20) if args.smoke else int(args.gib * 2**30)
    samples = 100 if args.smoke else args.samples
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = {"disk": run_all(args.dir, total, samples)}
    if not args.no_tmpfs and os.path.isdir("/dev/shm"):  # the store's own cost, without the disk's
        runs["tmpfs"] = run_all("/dev/shm", total, samples)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bench_store", *sys.argv[1:]]),
        "smoke": args.smoke,
        "machine": machine(),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
