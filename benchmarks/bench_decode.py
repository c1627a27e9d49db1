"""Decode throughput: requests/s and output tokens/s, end to end (raw images) vs from the store.

    python -m benchmarks.bench_decode --model DIR [--profile exact|fast] [--jobs 256]
        [--max-tokens 16,64,256] [--out benchmarks/results/bench_decode.json]
    python -m benchmarks.bench_decode --model DIR --smoke     # tiny sizes for the CPU

One engine (CUDA graphs on a GPU) runs both paths on the same prompts: end to end, vLLM
loads and encodes the raw images itself; from the store, the images' embeddings are read from
an LMDB store (filled by the real Encoder beforehand, not timed) and handed to vLLM. Every job
has its own image, so neither vLLM's encoder cache nor prefix caching can help the end-to-end
path; output lengths are fixed (EOS ignored), so both paths generate the same number of tokens.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    goal,
    publish,
    report_header,
    sizes_for,
    start_engine,
    write_images,
)
from splitvlm.core.config import Config
from splitvlm.core.sources import load_image
from splitvlm.decoder.jobs import Job, build_prompt
from splitvlm.decoder.pipeline import embeds_input, vllm_prompt
from splitvlm.store import EmbeddingStore
from splitvlm.tools.samples import PROMPTS

GOAL_SHORT = 5.0  # store vs end-to-end requests/s, at up to 64 output tokens
GOAL_LONG = 1.5  # the same at 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local Qwen2-VL checkpoint directory.")
    ap.add_argument("--profile", default="exact", choices=["exact", "fast"])
    ap.add_argument("--jobs", type=int, default=None, help="Jobs per max_tokens setting (default 256; smoke 4).")
    ap.add_argument("--max-tokens", default=None, help="Comma-separated output lengths (default 16,64,256; smoke 4,8).")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--eager", action="store_true", help="No CUDA graphs (default: graphs on a GPU).")
    ap.add_argument("--seed", type=int, default=11, help="Seed of the synthetic images.")
    ap.add_argument("--dir", default=None, help="Where the temporary images and store go.")
    ap.add_argument("--smoke", action="store_true", help="A tiny run for the CPU.")
    ap.add_argument("--out", default=str(RESULTS / "bench_decode.json"))
    args = ap.parse_args(argv)
    args.jobs = args.jobs or (4 if args.smoke else 256)
    args.max_tokens = args.max_tokens or ("4,8" if args.smoke else "16,64,256")
    return args


def make_jobs(paths: list[str], first: int) -> list[Job]:
    """One job per image, one image per job, prompts cycling through the sample prompts."""
    return [Job(f"job{first + i}", [path], [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": PROMPTS[(first + i) % len(PROMPTS)]}]}])
        for i, path in enumerate(paths)]


def fixed_length(engine, max_tokens: int):
    params = engine.sampling_params(max_tokens=max_tokens)
    params.ignore_eos = True  # every request runs to max_tokens on both paths
    return params


def end_to_end(engine, jobs: list[Job], params) -> tuple[float, int]:
    """Raw images through vLLM (as verify's end_to_end builds them); (seconds, output tokens)."""
    tokenizer = engine.tokenizer()
    t0 = time.perf_counter()
    prompts = [vllm_prompt(build_prompt(tokenizer, job), [load_image(p)[1] for p in job.images]) for job in jobs]
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def from_store(engine, jobs: list[Job], keys: list[list[str]], store: EmbeddingStore, params) -> tuple[float, int]:
    """Stored embeddings (read and checked) through vLLM; (seconds, output tokens)."""
    tokenizer = engine.tokenizer()
    expect = engine.expect()
    t0 = time.perf_counter()
    prompts = [vllm_prompt(build_prompt(tokenizer, job), embeds_input(store.get_many(job_keys, expect=expect)))
               for job, job_keys in zip(jobs, keys, strict=True)]
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def rates(jobs: int, seconds: float, tokens: int) -> dict:
    return {"seconds": seconds, "requests_per_s": jobs / seconds, "output_tokens": tokens,
            "output_tokens_per_s": tokens / seconds}


def run(engine, args: argparse.Namespace) -> dict:
    """The whole benchmark on an existing engine; returns the report (main writes it)."""
    from splitvlm.encoder import Encoder

    lengths = [int(n) for n in args.max_tokens.split(",")]
    sizes = sizes_for(args.smoke)
    root = Path(tempfile.mkdtemp(prefix="bench_decode_", dir=args.dir))
    try:
        n_warm = min(args.jobs, len(sizes))
        paths = write_images(root / "img", 0, n_warm + args.jobs * len(lengths), sizes, args.seed)
        cfg = engine.cfg.replace(store=str(root / "store.lmdb"), show_progress=False, overwrite=False)
        encoder = Encoder(cfg, engine=engine)
        stats = encoder.encode(paths)
        if stats.encoded != len(paths):
            raise RuntimeError(f"encoded {stats.encoded} of {len(paths)} images: {stats.failures[:3]}")
        keys = [[encoder.keys(Path(p).read_bytes())] for p in paths]
        jobs = make_jobs(paths, 0)
        results = []
        with EmbeddingStore(cfg.store, readonly=True) as store:
            warm = fixed_length(engine, lengths[0])
            end_to_end(engine, jobs[:n_warm], warm)
            from_store(engine, jobs[:n_warm], keys[:n_warm], store, warm)
            for k, max_tokens in enumerate(lengths):
                lo = n_warm + k * args.jobs
                part = slice(lo, lo + args.jobs)
                params = fixed_length(engine, max_tokens)
                e2e = rates(args.jobs, *end_to_end(engine, jobs[part], params))
                split = rates(args.jobs, *from_store(engine, jobs[part], keys[part], store, params))
                results.append({"max_tokens": max_tokens, "jobs": args.jobs, "end_to_end": e2e, "store": split,
                                "speedup": split["requests_per_s"] / e2e["requests_per_s"]})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    goals = {f"speedup_at_{r['max_tokens']}": goal(r["speedup"], GOAL_SHORT if r["max_tokens"] <= 64 else GOAL_LONG)
             for r in results}
    return {
        **report_header("bench_decode", engine, args),
        "cuda_graphs": engine.gpu and not engine.cfg.enforce_eager,
        "store_fill": {"images": stats.encoded, "seconds": stats.seconds, "images_per_s": stats.images_per_s},
        "results": results,
        "goals": goals,
    }


def summary(report: dict) -> str:
    lines = [f"bench_decode  {report['device']}  vLLM {report['vllm']}  profile {report['profile']}  "
             f"CUDA graphs {'on' if report['cuda_graphs'] else 'off'}",
             f"{'tokens':>6} {'jobs':>5} {'e2e req/s':>10} {'e2e tok/s':>10} {'store req/s':>12} "
             f"{'store tok/s':>12} {'speedup':>8}"]
    for r in report["results"]:
        e, s = r["end_to_end"], r["store"]
        lines.append(f"{r['max_tokens']:>6} {r['jobs']:>5} {e['requests_per_s']:>10.2f} "
                     f"{e['output_tokens_per_s']:>10.1f} {s['requests_per_s']:>12.2f} "
                     f"{s['output_tokens_per_s']:>12.1f} {r['speedup']:>7.2f}x")
    lines.append("goals: " + ", ".join(f"{k} {g['value']:.3g} {g['target']} {'met' if g['met'] else 'NOT met'}"
                                       for k, g in report["goals"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None, engine=None) -> dict:
    args = parse_args(argv)
    start_s = None
    if engine is None:
        engine, start_s = start_engine(Config(
            model=args.model, profile=args.profile, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, enforce_eager=True if args.eager else None, show_progress=False))
    return publish(run(engine, args), "benchmarks.bench_decode", argv, args.out, start_s, summary)


if __name__ == "__main__":
    main()
