"""Exactness and batch-invariance harness: split vs end-to-end at several batch sizes and orders.

python -m benchmarks.exactness --model DIR [--profile exact|fast] [--images 64 --prompts 4]
    [--batch-sizes 1,8,64,256] [--max-tokens 32] [--out benchmarks/results/exactness.json] [--smoke]

Runs the same jobs end to end (raw images) and split (embeddings from the encoder path) in one
engine, in chunks of each batch size and once in shuffled order, and counts identical outputs
for every pair of settings. Also checks the encoder against the embeddings vLLM computes inside
its own end-to-end run, and the batched vision tower against one image at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import encode_batches
from splitvlm.core.batching import chunks
from splitvlm.core.config import Config
from splitvlm.core.identity import environment
from splitvlm.core.profiles import settings_from
from splitvlm.tools.samples import PROMPTS, synthetic_image


def chat_prompt(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_chunks(engine, prompts: list[dict], order: list[int], batch: int, params) -> tuple[list[list[int]], float]:
    results: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for part in chunks(len(order), batch):
        idx = [order[i] for i in part]
        for i, out in zip(idx, engine.generate([prompts[i] for i in idx], params)):
            results[i] = list(out.outputs[0].token_ids)
    return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", default="exact")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-patches", type=int, default=65536)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="A tiny run for the CPU.")
    ap.add_argument("--out", default="benchmarks/results/exactness.json")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.prompts, args.batch_sizes, args.max_tokens = 4, 2, "1,8", 8
    from splitvlm.core.engine import Engine

    report: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    sizes = None
    if args.smoke:
        sizes = [(64, 64), (96, 128), (128, 96), (112, 112)]
    engine = Engine(Config(model=args.model, profile=args.profile, enforce_eager=True if args.eager else None,
                           max_model_len=4096, max_num_seqs=256))
    report["engine_start_s"] = time.perf_counter() - t0
    report["environment"] = {**environment(), "profile": args.profile,
                             "splitvlm_profile": os.environ.get("SPLITVLM_PROFILE", "")}
    settings = settings_from(report["environment"]["splitvlm_profile"])
    images = [synthetic_image(i, sizes[i % len(sizes)] if sizes else None, seed=1) for i in range(args.images)]
    prepared = [engine.preprocess(im) for im in images]
    patches = sum(int(g.prod()) for _, g in prepared)
    report["patches"] = patches

    # vision tower: per image vs batched, and timing of each
    tower = {}
    for mode in ("per_image", "batched"):
        os.environ["SPLITVLM_PROFILE"] = replace(settings, vision=mode).value()
        encode_batches(engine, prepared[:2], args.batch_patches)  # warm-up
        embeds, secs = encode_batches(engine, prepared, args.batch_patches)
        tower[mode] = (embeds, secs)
        report[f"tower_{mode}_images_per_s"] = len(images) / secs
    os.environ["SPLITVLM_PROFILE"] = settings.value()
    report["tower_batched_equal_per_image"] = sum(
        torch.equal(a, b) for a, b in zip(tower["per_image"][0], tower["batched"][0]))
    embeds = tower[settings.vision][0]
    save()

    tok = engine.tokenizer()
    params = engine.sampling_params(max_tokens=args.max_tokens)
    jobs = [(i, p) for p in range(args.prompts) for i in range(args.images)]
    texts = [chat_prompt(tok, PROMPTS[p % len(PROMPTS)]) for _, p in jobs]
    e2e_prompts = [{"prompt": t, "multi_modal_data": {"image": images[i]}} for t, (i, _) in zip(texts, jobs)]
    split_prompts = [{"prompt": t, "multi_modal_data": {"image": {"image_embeds": embeds[i], "image_grid_thw": prepared[i][1]}}}
                     for t, (i, _) in zip(texts, jobs)]
    report["jobs"] = len(jobs)

    # the encoder against the embeddings vLLM computes inside its own end-to-end run
    with engine.recording() as recorded:
        engine.generate(e2e_prompts[: args.images], engine.sampling_params(max_tokens=1))
    report["encoder_equal_to_e2e_internal"] = sum(
        any(r.shape == e.shape and torch.equal(r, e) for e in embeds) for r in recorded)
    report["e2e_internal_recorded"] = len(recorded)
    save()

    settings = {}
    order = list(range(len(jobs)))
    shuffled = order[:]
    random.Random(0).shuffle(shuffled)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # largest batches first: a run cut short by its time limit still has the cheap settings
    plan = [("shuffled", shuffled, max(batch_sizes))] + [(f"b{b}", order, b) for b in sorted(batch_sizes, reverse=True)]
    timings = {}
    for name, ordering, b in plan:
        for path, prompts in (("e2e", e2e_prompts), ("split", split_prompts)):
            engine.generate(prompts[:1], params)  # warm-up
            tokens, secs = run_chunks(engine, prompts, ordering, b, params)
            settings[f"{path}/{name}"] = tokens
            timings[f"{path}/{name}"] = {"seconds": secs, "requests_per_s": len(jobs) / secs,
                                         "output_tokens_per_s": sum(map(len, tokens)) / secs}
            report["timings"] = timings
            save()
    names = list(settings)
    report["identical"] = {f"{a} vs {b}": sum(x == y for x, y in zip(settings[a], settings[b]))
                           for a, b in itertools.combinations(names, 2)}
    report["all_identical"] = all(v == len(jobs) for v in report["identical"].values())
    report["distinct_outputs"] = len({tuple(t) for t in settings[names[0]]})
    save()
    print(json.dumps({k: v for k, v in report.items() if k not in ("timings",)}, indent=1))


if __name__ == "__main__":
    main()
