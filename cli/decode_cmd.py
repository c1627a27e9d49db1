"""`splitvlm decode`: greedy generation from stored embeddings."""

from __future__ import annotations

import json
import sys

import click

from splitvlm.cli.options import engine_options, make_config


@click.command("decode")
@engine_options
@click.option("--jobs", "jobs_path", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"id", "images": [path-or-key], "prompt"} or {"id", "messages": [...]} per line.')
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL results, one line per job, in job order.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--limit-images", type=int, default=8, show_default=True, help="Most images in one job.")
@click.option("--on-missing", type=click.Choice(["error", "encode", "skip"]), default="error", show_default=True,
              help="Images not in the store: stop before generating, encode them first, or skip those jobs.")
@click.option("--batch-jobs", type=int, default=256, show_default=True, help="Jobs handed to vLLM at once.")
def command(jobs_path, out, max_tokens, stop, limit_images, on_missing, batch_jobs, **kw) -> None:
    """Decode jobs from stored embeddings with greedy sampling in vLLM.

    Each output line holds id, text, token_ids, finish_reason, sha256 of the text,
    prompt_tokens and the store keys used. Exit status 2 when any job failed.
    """
    from splitvlm.decoder import Decoder, read_jobs

    cfg = make_config(**kw).replace(max_tokens=max_tokens, stop=list(stop), max_images_per_prompt=limit_images,
                                    on_missing=on_missing, batch_jobs=batch_jobs)
    jobs = read_jobs(jobs_path)
    decoder = Decoder(cfg)
    results = decoder.generate(jobs)
    with open(out, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    click.echo(decoder.stats.summary())
    click.echo(f"wrote {out}")
    if decoder.stats.failed:
        sys.exit(2)
