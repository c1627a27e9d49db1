"""The one-call GPU acceptance check: every user-facing step through the real CLI, one JSON verdict.

python -m benchmarks.gpu_check [--arch qwen2-vl-2b|qwen2.5-vl-3b|qwen3-vl-2b] [--device cuda] [--images 264] [--max-tokens 32]
    [--work /tmp/splitvlm-gpu-check] [--logs DIR] [--out benchmarks/results/gpu_check.json]

Steps: byte-compile vLLM's site where it is not (benchmarks.bytecode: what pip does at install,
which the unpacked GPU bundle skips); env --lock; make-model; encode (good and bad inputs; exit 2
with exactly the bad ones listed), alone on the GPU so its wall time is clean; store check. Then three lanes run side by
side, each engine with a fixed 16 GiB KV cache: (a) decode --cache (batch 256), decode --cache
again (all from the cache, identical), a locked decode with --spot-check; (b) verify (every job
and embedding); (c) the batch matrix (benchmarks.batch_matrix: batch 1, 8, 256, 1024 and
shuffled, against batch 256, and batch 256 against lane a's decode). The JSON is rewritten
after each step, so a run cut short still says how far it got. Exit status 1 on any mismatch,
failure or unmet limit. `make gpu-check` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.bytecode import compile_site
from benchmarks.check_corpus import make_corpus, write_jobs

ENCODE_LIMIT_S = 60.0  # encode wall time for the corpus, engine start included
FIRST_ENTRY_LIMIT_S = 20.0  # encode start to the first stored entry


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.logs = Path(args.logs or self.work / "logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.lock = threading.Lock()
        given = os.environ.get("SPLITVLM_PROFILE")  # an experiment's levers: part of the exact command
        prefix = [f"SPLITVLM_PROFILE='{given}'"] if given else []
        self.report: dict = {"command": " ".join([*prefix, "python -m benchmarks.gpu_check", *sys.argv[1:]]),
                             "commit": args.commit or git("rev-parse", "HEAD") or "unknown",
                             "dirty": bool(git("status", "--porcelain")) if not args.commit else "not known (--commit given)",
                             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}, "checks": {},
                             # an experiment's levers (core.profiles.LEVERS) reach every step through it
                             "splitvlm_profile": given or ""}

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        self.report["ok"] = bool(self.report["checks"]) and all(c["ok"] for c in self.report["checks"].values())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=2, ensure_ascii=False), encoding="utf-8")

    def run(self, name: str, argv: list[str], module: str = "splitvlm.cli.main") -> int:
        cmd = [sys.executable, "-m", module, *argv]
        t0 = time.perf_counter()
        with open(self.logs / f"{name}.log", "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=self.args.step_timeout,
                                    env=lane_env()).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        seconds = time.perf_counter() - t0
        with self.lock:
            self.report["steps"][name] = {"command": " ".join(cmd[1:]), "rc": rc, "seconds": round(seconds, 2)}
        print(f"{name}: rc {rc}, {seconds:.1f} s", flush=True)
        self.save()
        return rc

    def check(self, name: str, ok: bool, **facts) -> None:
        with self.lock:
            self.report["checks"][name] = {"ok": bool(ok), **facts}
        print(f"  {'ok ' if ok else 'FAIL'} {name} {json.dumps(facts, ensure_ascii=False)[:300]}", flush=True)
        self.save()


def lane_env() -> dict[str, str]:
    """Each step's environment: torch's CPU threads capped, because three lanes share the host and
    vLLM runs inside splitvlm's process, where it leaves torch at one thread per core. In the run
    at 260579e, uncapped, every lane ran 2-5x slower than alone and the check ran out of time."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 4) // 4))
    return {**os.environ, "OMP_NUM_THREADS": threads}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def same_outputs(a: list[dict], b: list[dict]) -> int:
    return sum(x["id"] == y["id"] and x.get("token_ids") == y.get("token_ids") and x.get("text") == y.get("text")
               and x.get("error") is None for x, y in zip(a, b))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2-vl-2b",
                    help="The make-model architecture checked: qwen2-vl-2b, qwen2.5-vl-3b or qwen3-vl-2b "
                         "(the tiny ones for CPU smoke runs).")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="Where make-model draws the weights.")
    ap.add_argument("--images", type=int, default=264, help="Good images (the eight bad inputs come on top).")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--spot-check", type=float, default=0.05)
    ap.add_argument("--sample", type=int, default=32, help="Jobs the batch matrix runs alone.")
    ap.add_argument("--lane-kv-bytes", type=int, default=16 << 30,
                    help="KV cache of each lane's engine: fixed, since vLLM's free-memory sizing counts what the "
                         "other lanes allocate while it measures.")
    ap.add_argument("--work", default="/tmp/splitvlm-gpu-check")
    ap.add_argument("--logs", help="Where each step's log goes (default WORK/logs).")
    ap.add_argument("--out", help="The JSON verdict (default benchmarks/results/gpu_check.json for qwen2-vl-2b, "
                                  "gpu_check_ARCH.json for another --arch).")
    ap.add_argument("--commit", help="The commit being checked, where the tree has no .git (a device copy).")
    ap.add_argument("--step-timeout", type=float, default=420)
    ap.add_argument("--lanes", default="decode,verify,matrix",
                    help="Which lanes run after encode (comma list; 'none' for encode and store check only).")
    ap.add_argument("--max-model-len", type=int, default=32768,
                    help="Each lane's context: Qwen2-VL-2B's own; Qwen3-VL's 262,144 needs 28 GiB of KV cache, "
                         "more than a lane's fixed cache (seen on the H200 at 031e8a3).")
    ap.add_argument("--lane-memory", type=float, default=0.2,
                    help="--gpu-memory-utilization of each lane's engine: vLLM refuses to start unless that share "
                         "of the GPU is free, whatever the KV cache size.")
    ap.add_argument("--no-limits", action="store_true", help="Skip the wall-time limits (for CPU smoke runs).")
    args = ap.parse_args(argv)
    if args.out is None:
        suffix = "" if args.arch == "qwen2-vl-2b" else f"_{args.arch}"
        args.out = f"benchmarks/results/gpu_check{suffix}.json"
    return args


def encode_steps(c: Check, common: list[str], corpus) -> None:
    w = c.work
    rc = c.run("encode", ["encode", *common, "--failures", str(w / "failures.jsonl"),
                          "--stats-json", str(w / "encode.json"), str(corpus.root / "images")])
    stats, failed = load(w / "encode.json"), sorted(f["path"] for f in read_jsonl(w / "failures.jsonl"))
    c.report["encode"] = {k: v for k, v in stats.items() if k != "failures"}
    c.check("encode_bad_inputs_listed", rc == 3 and failed == corpus.bad, rc=rc, listed=len(failed),
            unexpected=sorted(set(failed) - set(corpus.bad)), missed=sorted(set(corpus.bad) - set(failed)))
    c.check("encode_stored_all_good", stats.get("encoded") == len(corpus.good), encoded=stats.get("encoded"))
    encode_s = c.report["steps"]["encode"]["seconds"]
    first = stats.get("first_stored_s")
    c.check("encode_speed", c.args.no_limits or (encode_s <= ENCODE_LIMIT_S and first is not None
                                                 and first <= FIRST_ENTRY_LIMIT_S),
            wall_s=encode_s, first_stored_s=first, engine_start_s=stats.get("engine_start_s"),
            images_per_s=stats.get("images_per_s"), limits=[ENCODE_LIMIT_S, FIRST_ENTRY_LIMIT_S])
    engine = stats.get("engine", {})
    # the tower alone, eager; a family whose tower needs it (Qwen2.5-VL): the full engine, as the decoder runs it
    from splitvlm.core.families import family_of_model

    tower_only = not family_of_model(w / "model").exact_needs_full_engine
    c.check("encode_engine", bool(engine.get("mm_encoder_only")) is tower_only
            and (engine.get("enforce_eager") is True or not tower_only), tower_only=tower_only, engine=engine)
    rc = c.run("store_check", ["store", "check", "--store", str(w / "store")])
    c.check("store_check", rc == 0)


def lane_decode(c: Check, common: list[str], jobs: list[str], njobs: int) -> None:
    """decode --cache, decode --cache again, then a locked decode with a spot check."""
    w = c.work
    rc = c.run("decode", ["decode", *common, *jobs, "--cache", "--out", str(w / "decode1.jsonl"),
                          "--stats-json", str(w / "decode1.json")])
    first_run = read_jsonl(w / "decode1.jsonl")
    c.report["decode"] = load(w / "decode1.json")
    c.check("decode", rc == 0 and len(first_run) == njobs and all(r.get("error") is None for r in first_run),
            rc=rc, results=len(first_run))
    rc = c.run("decode_cached", ["decode", *common, *jobs, "--cache", "--out", str(w / "decode2.jsonl"),
                                 "--stats-json", str(w / "decode2.json")])
    second = read_jsonl(w / "decode2.jsonl")
    cached = sum(bool(r.get("cached")) for r in second)
    c.check("cache_second_run", rc == 0 and cached == njobs and same_outputs(first_run, second) == njobs,
            cached=cached, identical=same_outputs(first_run, second), jobs=njobs,
            engine_started=bool(load(w / "decode2.json").get("engine")))
    rc = c.run("locked_spot_check", ["decode", *common, *jobs, "--lock", str(w / "lock.json"),
                                     "--spot-check", str(c.args.spot_check), "--out", str(w / "spot.jsonl"),
                                     "--stats-json", str(w / "spot.json")])
    spot = load(w / "spot.json").get("spot_check", {})
    spot_out = read_jsonl(w / "spot.jsonl")
    c.check("locked_spot_check", rc == 0 and spot.get("identical") == len(spot.get("checked", [])) > 0
            and same_outputs(first_run, spot_out) == njobs,
            checked=len(spot.get("checked", [])), identical=spot.get("identical"),
            same_as_first_decode=same_outputs(first_run, spot_out))


def lane_verify(c: Check, common: list[str], jobs: list[str], njobs: int) -> None:
    w = c.work
    rc = c.run("verify", ["verify", *common, *jobs, "--report", str(w / "verify.json")])
    v = load(w / "verify.json")
    c.report["verify"] = {k: v.get(k) for k in ("total", "identical", "embeddings_checked", "embeddings_identical",
                                                  "seconds", "engine", "ok")}
    c.report["verify"]["differ"] = [j["id"] for j in v.get("jobs", []) if not j["identical"]][:20]
    c.check("verify", rc == 0 and v.get("ok") is True and v.get("total") == njobs,
            identical=v.get("identical"), total=v.get("total"),
            embeddings=f"{v.get('embeddings_identical')}/{v.get('embeddings_checked')}")


def matrix_argv(args: argparse.Namespace, work: Path, jobs: list[str]) -> list[str]:
    """benchmarks.batch_matrix's command line for lane c (tests/test_benchmarks.py parses it with its parser)."""
    return ["--model", str(work / "model"), "--store", str(work / "store"), *jobs, "--sample", str(args.sample),
            "--kv-cache-memory-bytes", str(args.lane_kv_bytes), "--gpu-memory-utilization", str(args.lane_memory),
            "--max-model-len", str(args.max_model_len), "--save-outputs", str(work / "batch_256.jsonl"), "--out", str(work / "matrix.json")]


def lane_matrix(c: Check, _common: list[str], jobs: list[str], njobs: int) -> None:
    w = c.work
    rc = c.run("batch_matrix", matrix_argv(c.args, w, jobs), module="benchmarks.batch_matrix")
    m = load(w / "matrix.json")
    c.report["batch_matrix"] = {k: m.get(k) for k in ("settings", "engine", "ok")}
    c.check("batch_matrix", rc == 0 and m.get("ok") is True and m.get("settings", {}).get("batch_256", {}).get("jobs") == njobs,
            settings={n: f"{s['identical_to_batch_256']}/{s['jobs']}" for n, s in m.get("settings", {}).items()})


LANES = {"decode": lane_decode, "verify": lane_verify, "matrix": lane_matrix}


def main() -> None:
    args = parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    Path(args.work).mkdir(parents=True)
    c = Check(args)
    w = c.work
    model, store = str(w / "model"), str(w / "store")
    # bytecode first, as pip would have made it at install: the bundle is unpacked, not installed
    c.report["bytecode"] = compile_site("vllm")
    print(f"bytecode: {json.dumps(c.report['bytecode'])}", flush=True)
    rc = c.run("env", ["env", "--json", "--lock", str(w / "lock.json")])
    c.report["environment"] = load(w / "lock.json").get("environment", {}) if (w / "lock.json").exists() else {}
    c.report["lane_omp_threads"] = lane_env()["OMP_NUM_THREADS"]
    c.check("env_lock", rc == 0)
    rc = c.run("make_model", ["make-model", "--arch", args.arch, "--out", model, "--device", args.device])
    c.check("make_model", rc == 0, arch=args.arch)
    corpus = make_corpus(w / "corpus", args.images)
    njobs = write_jobs(corpus, w / "jobs.jsonl")
    c.report["corpus"] = {"good": len(corpus.good), "bad": len(corpus.bad), "jobs": njobs}
    common = ["--model", model, "--store", store, "--no-progress"]
    encode_steps(c, common, corpus)

    jobs = ["--jobs", str(w / "jobs.jsonl"), "--max-tokens", str(args.max_tokens)]
    shared = [*common, "--kv-cache-memory-bytes", str(args.lane_kv_bytes),
              "--gpu-memory-utilization", str(args.lane_memory), "--max-model-len", str(args.max_model_len)]
    chosen = [LANES[name] for name in args.lanes.split(",") if name in LANES]
    c.report["lanes"] = args.lanes
    with ThreadPoolExecutor(3) as lanes:
        for future in [lanes.submit(lane, c, shared, jobs, njobs) for lane in chosen]:
            future.result()
    if lane_decode in chosen and lane_matrix in chosen:
        same = same_outputs(read_jsonl(w / "decode1.jsonl"), read_jsonl(w / "batch_256.jsonl"))
        c.check("matrix_equals_decode", same == njobs, identical=same, jobs=njobs)
    print(f"gpu check: {'PASS' if c.report['ok'] else 'FAIL'}; wrote {c.out}")
    sys.exit(0 if c.report["ok"] else 1)


if __name__ == "__main__":
    main()
