"""splitvlm exact decode against vLLM's defaults, both fed the same stored embeddings, side by side.

    python -m benchmarks.bench_vs_vllm --model DIR [--jobs 256] [--rounds 8] [--max-tokens 16,64,256]
        [--batches 8,256] [--commit SHA] [--out benchmarks/results/bench_vs_vllm.json]
    python -m benchmarks.bench_vs_vllm --model DIR --smoke      # tiny sizes for the CPU

The images are encoded once into a store (splitvlm encode, not timed). Then two processes run
one right after the other on the same machine: the reference, vLLM 'LLM' with its defaults
(engine core in its own process, prefix caching, its attention and GEMM kernels, CUDA graphs),
and splitvlm's exact profile through Engine (engine core in its own process on a GPU: the
plugin carries the kernels there). Each cell (output length x batch) uses images neither side has
seen before in that process, EOS is ignored, and requests go to vLLM `batch` at a time. The
ratio is splitvlm's requests/s over the reference's; issue #16's goal is >= 0.90 everywhere.

    python -m benchmarks.bench_vs_vllm --model DIR --variants exact,exact_cublas,exact_fa3,fast

runs the ablation: each variant (VARIANTS: the exact profile with one setting changed, or fast) is
one more process after the reference, timed on the same cells, and each side also answers the
same probe jobs once all at once and once one by one. The report says, per variant, its ratio in
every cell, whether its probe answers are batch-invariant, and whether they equal the exact
profile's (the bytes stored results and caches were made with).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    VARIANTS,
    command,
    goal,
    run_side,
    sizes_for,
    variant_setup,
    write_images,
    write_report,
)
from benchmarks.kernel_trace import by_class, gaps, trace_totals
from splitvlm.core.batching import chunks
from splitvlm.core.identity import environment

GOAL = 0.90
PROBE_JOBS = 32  # smoke: 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen2-VL checkpoint directory.")
    ap.add_argument("--jobs", type=int, default=None, help="Jobs per cell (default 256; smoke 8).")
    ap.add_argument("--max-tokens", default=None, help="Output lengths (default 16,64,256; smoke 4,8).")
    ap.add_argument("--batches", default=None, help="Requests handed to vLLM at once (default 8,256; smoke 2,8).")
    ap.add_argument("--rounds", type=int, default=0,
                    help="Cap a cell at this many batches: min(jobs, rounds x batch) jobs (0: every cell has --jobs).")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--commit", default="", help="The commit measured (the device has no .git).")
    ap.add_argument("--dir", default=None, help="Where images and the store go.")
    ap.add_argument("--out", default=str(RESULTS / "bench_vs_vllm.json"))
    ap.add_argument("--variants", default="exact",
                    help=f"splitvlm sides to time, comma-separated, the first is 'splitvlm' in the report: {', '.join(VARIANTS)}.")
    ap.add_argument("--kernels", action="store_true",
                    help="After the timed cells, profile one batch of the smallest-batch cell on each side "
                         "(vLLM's torch profiler, engine core included) and report kernel time per output step "
                         "by class (benchmarks.kernel_trace).")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # "reference" or a variant
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.jobs = args.jobs or (8 if args.smoke else 256)
    args.max_tokens = args.max_tokens or ("4,8" if args.smoke else "16,64,256")
    args.batches = args.batches or ("2,8" if args.smoke else "8,256")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; one of {', '.join(VARIANTS)}")
    return args


def cell_jobs(args: argparse.Namespace, batch: int) -> int:
    """Jobs in a cell: --jobs, or at most --rounds batches of it."""
    return min(args.jobs, args.rounds * batch) if args.rounds else args.jobs


def prepare(args: argparse.Namespace, root: Path) -> dict:
    """Images for a warm-up and for every cell, encoded into one store; the plan both sides run."""
    lengths = [int(n) for n in args.max_tokens.split(",")]
    batches = [int(n) for n in args.batches.split(",")]
    cells = list(itertools.product(lengths, batches))
    warm, probe = 8, 4 if args.smoke else PROBE_JOBS
    per_cell = [cell_jobs(args, batch) for _, batch in cells]
    paths = write_images(root / "img", 0, warm + probe + sum(per_cell), sizes_for(args.smoke), seed=23)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "splitvlm.cli.main", "encode", "--model", args.model,
                         "--store", str(root / "store"), "--no-progress", str(root / "img")]).returncode
    if rc != 0:
        raise SystemExit(f"encode failed with exit status {rc}")
    plan = {"model": args.model, "store": str(root / "store"), "max_model_len": args.max_model_len,
            "kernels": str(root / "traces") if args.kernels else None,
            "warm": paths[:warm], "probe": paths[warm:warm + probe], "encode_s": time.perf_counter() - t0, "cells": []}
    lo = warm + probe
    for (max_tokens, batch), jobs in zip(cells, per_cell):
        plan["cells"].append({"max_tokens": max_tokens, "batch": batch, "images": paths[lo:lo + jobs]})
        lo += jobs
    return plan


def _prompts(plan: dict, paths: list[str], tokenizer) -> list[dict]:
    """One job per image, as splitvlm decode builds them, with the stored embeddings."""
    from splitvlm.core.config import Config
    from splitvlm.core.provenance import KeyMaker
    from splitvlm.decoder.jobs import Job, build_prompt
    from splitvlm.decoder.pipeline import embeds_input, vllm_prompt
    from splitvlm.store import EmbeddingStore
    from splitvlm.tools.samples import PROMPTS

    keys = KeyMaker(Config(model=plan["model"]))
    out = []
    with EmbeddingStore(plan["store"], readonly=True) as store:
        for i, path in enumerate(paths):
            job = Job(f"j{i}", [path], [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}])
            entries = store.get_many([keys(Path(path).read_bytes())])
            out.append(vllm_prompt(build_prompt(tokenizer, job), embeds_input(entries)))
    return out


def profiler(plan: dict, side_name: str) -> dict:
    """Engine arguments that let `LLM.start_profile()` trace this side (none without --kernels)."""
    if not plan.get("kernels"):
        return {}
    folder = str(Path(plan["kernels"]) / side_name)
    return {"profiler_config": {"profiler": "torch", "torch_profiler_dir": folder, "torch_profiler_with_stack": False}}


def side(args: argparse.Namespace) -> None:
    """One side in this process: start its engine, warm it up, time every cell."""
    from vllm import SamplingParams

    plan = json.loads(Path(args.plan).read_text())
    t0 = time.perf_counter()
    if args.side == "reference":
        import torch
        from vllm import LLM

        cpu = {} if torch.cuda.is_available() else {"gpu_memory_utilization": 0.3}  # a CPU smoke run only
        llm = LLM(model=plan["model"], enable_mm_embeds=True, limit_mm_per_prompt={"image": 1, "video": 0},
                  max_model_len=plan["max_model_len"], seed=0, **cpu, **profiler(plan, args.side))
        generate, tokenizer, settings = llm.generate, llm.get_tokenizer(), {"vllm_defaults": True}
    else:
        from splitvlm.core.config import Config
        from splitvlm.core.engine import Engine

        chosen = variant_setup(args.side)
        chosen["vllm_args"].update(profiler(plan, args.side))
        cfg = Config(model=plan["model"], max_model_len=plan["max_model_len"], show_progress=False, **chosen)
        engine = Engine(cfg, model_access=False)
        llm, generate, tokenizer, settings = engine.llm, engine.generate, engine.tokenizer(), engine.reported()
    start_s = time.perf_counter() - t0

    def run(prompts: list[dict], max_tokens: int, batch: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
        t = time.perf_counter()
        tokens = 0
        for part in chunks(len(prompts), batch):
            tokens += sum(len(o.outputs[0].token_ids) for o in generate(prompts[part.start:part.stop], params))
        return time.perf_counter() - t, tokens

    run(_prompts(plan, plan["warm"], tokenizer), 8, 8)
    probe = _prompts(plan, plan["probe"], tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=16, seed=0)
    together = [list(o.outputs[0].token_ids) for o in generate(probe, params)]
    alone = [list(generate([p], params)[0].outputs[0].token_ids) for p in probe]
    cells = []
    for cell in plan["cells"]:
        prompts = _prompts(plan, cell["images"], tokenizer)  # read before the clock starts, on both sides
        seconds, tokens = run(prompts, cell["max_tokens"], cell["batch"])
        cells.append({"max_tokens": cell["max_tokens"], "batch": cell["batch"], "jobs": len(prompts),
                      "seconds": seconds, "requests_per_s": len(prompts) / seconds,
                      "output_tokens_per_s": tokens / seconds, "output_tokens": tokens})
    result = {"side": args.side, "engine_start_s": start_s, "engine": settings, "cells": cells,
              "probe": {"token_ids": together, "batch_invariant": sum(a == b for a, b in zip(together, alone))}}
    if plan.get("kernels"):  # one batch of the smallest-batch cell, under vLLM's profiler
        cell = min(plan["cells"], key=lambda c: (c["batch"], c["max_tokens"]))
        llm.start_profile()
        generate(_prompts(plan, cell["images"][:cell["batch"]], tokenizer),
                 SamplingParams(temperature=0.0, max_tokens=cell["max_tokens"], ignore_eos=True, seed=0))
        llm.stop_profile()
        totals = trace_totals(Path(plan["kernels"]) / args.side)
        kernels = by_class(totals["by_name"], cell["max_tokens"])
        # the same cell timed without the profiler: wall ms per step; what the kernels leave of it is
        # host work or idle device (launches outside CUDA graphs, scheduling, sampling on the CPU)
        timed = next(c for c in cells if (c["batch"], c["max_tokens"]) == (cell["batch"], cell["max_tokens"]))
        wall = 1000 * timed["seconds"] / (-(-timed["jobs"] // cell["batch"]) * cell["max_tokens"])
        result["kernels"] = {"batch": cell["batch"], "max_tokens": cell["max_tokens"], "timed": totals["timed"],
                             "unit": "output step", **kernels, "wall_ms_per_unit": round(wall, 4),
                             "kernel_share_of_wall": round(kernels["total_ms_per_unit"] / wall, 4) if wall else None}
    Path(args.plan).with_name(f"{args.side}.json").write_text(json.dumps(result))


def summarize(args: argparse.Namespace, argv: list[str] | None, plan: dict, sides: dict, failed: dict) -> dict:
    """The report from the sides done so far: per cell the first variant against the reference, the ablation."""
    variants = [v for v in args.variants.split(",") if v in sides]
    first = args.variants.split(",")[0]
    cells = []
    for k, ref in enumerate(sides["reference"]["cells"] if first in sides else []):
        ours = sides[first]["cells"][k]
        ratio = ours["requests_per_s"] / ref["requests_per_s"]
        cells.append({"max_tokens": ref["max_tokens"], "batch": ref["batch"], "reference": ref, "splitvlm": ours,
                      "ratio": ratio, "goal": goal(ratio, GOAL)})
    exact_ids = sides["exact"]["probe"]["token_ids"] if "exact" in sides else None
    ablation = {name: {"ratios": [round(c["requests_per_s"] / r["requests_per_s"], 3)
                                  for c, r in zip(sides[name]["cells"], sides["reference"]["cells"], strict=True)],
                       "probe_batch_invariant": f"{sides[name]['probe']['batch_invariant']}/{len(plan['probe'])}",
                       "probe_token_ids": sides[name]["probe"]["token_ids"],  # to compare across reports
                       "probe_same_as_exact": None if exact_ids is None else
                       f"{sum(a == b for a, b in zip(sides[name]['probe']['token_ids'], exact_ids))}/{len(exact_ids)}"}
                for name in variants}
    return {"benchmark": "bench_vs_vllm", "commit": args.commit, "command": command("benchmarks.bench_vs_vllm", argv),
            "smoke": args.smoke, "environment": environment(), "encode_s": plan["encode_s"],
            "engines": {name: {k: s[k] for k in ("engine_start_s", "engine")} for name, s in sides.items()},
            "cells": cells, "goal_met": bool(cells) and all(c["goal"]["met"] for c in cells),
            "kernels": {name: s["kernels"] for name, s in sides.items() if "kernels" in s},
            "kernel_gaps": {name: gaps(sides["reference"]["kernels"], s["kernels"]) for name, s in sides.items()
                            if name != "reference" and "kernels" in s and "kernels" in sides.get("reference", {})},
            "cell_order": [[c["max_tokens"], c["batch"]] for c in cells], "ablation": ablation,
            "complete": not failed and len(sides) == 1 + len(args.variants.split(",")), "failed_sides": failed}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.side:
        side(args)
        return {}
    if args.dir:  # the H200 run at 0dc8242 stopped here: --dir /tmp/bv did not exist yet
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_vs_vllm_", dir=args.dir))
    plan = prepare(args, root)
    (root / "plan.json").write_text(json.dumps(plan))
    sides: dict = {}
    failed: dict = {}
    for name in ("reference", *args.variants.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.bench_vs_vllm", "--model", args.model, "--side", name,
               "--plan", str(root / "plan.json")]
        if not run_side(name, cmd, root / f"{name}.json", sides, failed) and name == "reference":
            raise SystemExit(f"reference side failed ({failed[name]})")  # a variant's failure: the others still run
        report = summarize(args, argv, plan, sides, failed)
        path = write_report(report, args.out)  # after every side: a run cut short keeps what it measured
    for c in report["cells"]:
        print(f"{c['max_tokens']:>4} tokens  batch {c['batch']:>4}: reference {c['reference']['requests_per_s']:8.2f} "
              f"req/s  splitvlm {c['splitvlm']['requests_per_s']:8.2f} req/s  ratio {c['ratio']:.2f}")
    for name, row in report["ablation"].items():
        print(f"{name}: ratios {row['ratios']}, probe batch-invariant {row['probe_batch_invariant']}, "
              f"same as exact {row['probe_same_as_exact']}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
