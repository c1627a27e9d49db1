"""`splitvlm verify`: prove split == end-to-end, byte for byte."""

from __future__ import annotations

import sys

import click

from splitvlm.cli.options import (
    check_writable,
    default,
    engine_options,
    make_config,
    missing_encoder,
)


@click.command("verify")
@engine_options
@click.option("--jobs", "jobs_path", required=True, type=click.Path(dir_okay=False), help="JSONL jobs, as for decode.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=default("max_tokens"), show_default=True)
@click.option("--on-missing", type=click.Choice(["error", "encode", "skip"]), default="encode", show_default=True,
              help="Images not in the store: stop, encode them first, or skip those jobs.")
@click.option("--batch-jobs", type=click.IntRange(min=1), default=256, show_default=True, help="Jobs handed to vLLM at once, in both paths.")
def command(jobs_path, report, max_tokens, on_missing, batch_jobs, **kw) -> None:
    """Run every job end to end (raw images) and from the store, in one engine with the
    same settings and batches, and compare token ids and text bytes job by job.

    Every stored embedding used is also recomputed and compared bit for bit. Prints a
    table ending in `identical N/N`. Exit status 0 when all jobs and embeddings match, 4 when
    a job or an embedding differs, else 3 when some jobs failed to run.
    """
    from splitvlm.decoder import read_jobs
    from splitvlm.verify import Verifier

    if report:
        check_writable(report, "--report")
    cfg = make_config(**kw)
    cfg = cfg.replace(max_tokens=max_tokens, on_missing=on_missing, batch_jobs=batch_jobs,
                      show_progress=cfg.show_progress and sys.stderr.isatty())  # no bars in logs
    jobs = read_jobs(jobs_path)
    verifier = Verifier(cfg, encode_missing=missing_encoder(cfg, lambda: verifier.engine))  # one engine for all
    result = verifier.run(jobs)
    if report:
        result.write(report)
    click.echo(result.table())
    if report:
        click.echo(f"report: {report}")
    if result.embedding_mismatches or any(not j.identical and j.error is None for j in result.jobs):
        sys.exit(4)  # a mismatch found
    if any(j.error is not None for j in result.jobs):
        sys.exit(3)  # some jobs failed, the rest compared identical
    if not result.ok:
        sys.exit(1)
