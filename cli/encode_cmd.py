"""`splitvlm encode`: pre-encode images into the store."""

from __future__ import annotations

import json
import sys

import click

from splitvlm.cli.options import check_writable, default, engine_options, make_config


@click.command("encode")
@engine_options
@click.option("--failures", type=click.Path(dir_okay=False), help="Write one JSON line {path, error} per failed input.")
@click.option("--batch-patches", type=click.IntRange(min=1), default=default("batch_patches"), show_default=True, help="Vision tower budget per step, in patches.")
@click.option("--loader-threads", type=click.IntRange(min=1), default=default("loader_threads"), show_default=True, help="Threads that read and preprocess images.")
@click.option("--full-engine", is_flag=True,
              help="Start vLLM with the language model and a KV cache too (default: the vision tower alone, "
                   "vLLM's mm_encoder_only mode).")
@click.option("--overwrite", is_flag=True, help="Recompute entries already in the store (default: skip them, so runs resume).")
@click.option("--stats-json", type=click.Path(dir_okay=False), help="Write the run's figures as JSON.")
@click.argument("inputs", nargs=-1, required=True)
def command(inputs, failures, batch_patches, loader_threads, full_engine, overwrite, stats_json, **kw) -> None:
    """Encode images with vLLM's own Qwen2-VL vision tower into the store.

    INPUTS are image files, folders (recursive), globs, .txt lists of paths or .jsonl files
    with an "image" field. Images already stored are skipped. Bad inputs are reported one
    line each and the run goes on. Exit status 0 when every input is stored, 3 when some failed.
    """
    from splitvlm.encoder import Encoder

    for path, option in ((failures, "--failures"), (stats_json, "--stats-json")):
        if path:
            check_writable(path, option)
    cfg = make_config(**kw).replace(failures=failures, batch_patches=batch_patches,
                                    loader_threads=loader_threads, overwrite=overwrite,
                                    encoder_only=not full_engine)
    stats = Encoder(cfg).encode(inputs)
    click.echo(stats.summary())
    if stats_json:
        with open(stats_json, "w", encoding="utf-8") as f:
            json.dump(stats.to_dict(), f, indent=2)
    if stats.failed:
        sys.exit(3)  # some inputs failed, the rest stored
