"""`splitvlm decode`: greedy generation from stored embeddings."""

from __future__ import annotations

import json
import sys

import click

from splitvlm.cli.options import check_writable, engine_options, make_config, output_file


def end_to_end_runner(decoder):
    """The verifier's end-to-end path and embedding check in the decoder's engine, as spot_check takes them."""
    from splitvlm.store import EmbeddingStore
    from splitvlm.verify.verifier import Report, Verifier

    def run(jobs, keys):
        verifier, report = Verifier(decoder.cfg, engine=decoder.engine), Report()
        with EmbeddingStore(decoder.cfg.store, readonly=True) as store:
            results = verifier.end_to_end(jobs, keys, [None] * len(jobs), store)
            ran = [n for n, r in enumerate(results) if r.error is None]
            verifier.check_embeddings([jobs[n] for n in ran], [keys[n] for n in ran], store, report)
        return results, {m["key"]: m["error"] for m in report.embedding_mismatches}

    return run


@click.command("decode")
@engine_options
@click.option("--jobs", "jobs_path", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"id", "images": [path-or-key], "prompt"} or {"id", "messages": [...]} per line.')
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSONL results, one line per job, in job order ('-': standard output). Checked before any work.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--limit-images", type=click.IntRange(min=1), default=8, show_default=True, help="Most images in one job.")
@click.option("--on-missing", type=click.Choice(["error", "encode", "skip"]), default="error", show_default=True,
              help="Images not in the store: stop before generating, encode them first, or skip those jobs.")
@click.option("--batch-jobs", type=click.IntRange(min=1), default=256, show_default=True, help="Jobs handed to vLLM at once.")
@click.option("--cache", is_flag=True,
              help="Answer jobs decoded before (same embeddings, prompt, settings and versions) from the store's "
                   "result cache, and cache new results; exact profile only.")
@click.option("--spot-check", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of the jobs to also run end to end (raw images) and compare byte for byte.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which jobs the spot check picks.")
@click.option("--stats-json", type=click.Path(dir_okay=False),
              help="Write the run's figures (and the engine's settings as vLLM reported them) as JSON.")
def command(jobs_path, out, max_tokens, stop, limit_images, on_missing, batch_jobs, cache, spot_check, seed,
            stats_json, **kw) -> None:
    """Decode jobs from stored embeddings with greedy sampling in vLLM.

    Each output line holds id, text, token_ids, finish_reason, sha256 of the text,
    prompt_tokens and the store keys used; with --cache also "cached", with --spot-check
    "spot_checked" and "spot_check_identical" on the jobs checked: identical when the tokens and
    text bytes are the end-to-end ones and each stored embedding used is bit for bit a fresh
    encode. Exit status 3 when a spot check found a mismatch, else 2 when any job failed.
    """
    from splitvlm.decoder import Decoder, read_jobs
    from splitvlm.decoder.spot_check import spot_check as run_spot_check

    cfg = make_config(**kw).replace(max_tokens=max_tokens, stop=list(stop), max_images_per_prompt=limit_images,
                                    on_missing=on_missing, batch_jobs=batch_jobs, cache=cache)
    check_writable(out, "--out")
    if stats_json:
        check_writable(stats_json, "--stats-json")
    decoder = Decoder(cfg)
    jobs = read_jobs(jobs_path)
    results = decoder.generate(jobs)
    report = None
    if spot_check > 0:
        report = run_spot_check(jobs, results, spot_check, seed, end_to_end_runner(decoder))
    with output_file(out) as f:
        for r in results:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    click.echo(decoder.stats.summary(), err=out == "-")
    if report is not None:
        click.echo(report.summary(), err=out == "-")
    if out != "-":
        click.echo(f"wrote {out}")
    if stats_json:
        figures = {**decoder.stats.to_dict(), "engine": decoder.engine_settings()}
        if report is not None:
            figures["spot_check"] = report.to_json()
        with open(stats_json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    if report is not None and report.mismatches:
        sys.exit(3)
    if decoder.stats.failed or (report is not None and report.errors):
        sys.exit(2)
