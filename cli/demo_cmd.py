"""`splitvlm demo`: the whole idea on the tiny model, from a fresh machine, in a few minutes on a CPU."""

from __future__ import annotations

import sys

import click

from splitvlm.tools.demo import DEFAULT_WORKDIR


@click.command("demo")
@click.option("--workdir", default=DEFAULT_WORKDIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the model, images, jobs, store, outputs and report go (reused by later runs).")
@click.option("--images", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images in the corpus: photographs and scans from matplotlib's sample data, generated pictures, "
                   "then synthetic ones.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=24, show_default=True,
              help="Greedy tokens per job.")
@click.option("--fresh", is_flag=True, help="Delete the workdir first (only one the demo made).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(workdir: str, images: int, max_tokens: int, fresh: bool, no_progress: bool) -> None:
    """Build the tiny model, encode a small corpus into a store, decode jobs from it, and verify
    that every output is byte for byte the end-to-end output: one vLLM engine for all stages.

    \b
    Each job is one image with one of three prompts (one in Chinese), plus one job with two
    images. Exit status 0 only when every job and every stored embedding is identical.
    """
    from splitvlm.tools.demo import run_demo

    result = run_demo(workdir, images=images, max_tokens=max_tokens, fresh=fresh,
                      echo=click.echo, show_progress=not no_progress)
    if not result.ok:
        sys.exit(1)
