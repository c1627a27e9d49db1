"""`splitvlm encode`: pre-encode images into the store (in this process, or on Ray with --ray)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from splitvlm.cli.options import check_writable, default, engine_options, make_config

if TYPE_CHECKING:
    from splitvlm.encoder.inputs import Inputs
    from splitvlm.encoder.ray_encode import RayOptions


def ray_options(use_ray: bool, address: str | None, gpus: int | None, workers: int | None, ray_batch: int | None,
                overwrite: bool) -> RayOptions | None:
    """The --ray options checked against each other (usage errors, before Ray or any engine starts)."""
    from splitvlm.encoder.ray_encode import RayOptions

    given = [name for name, value in (("--address", address), ("--gpus", gpus), ("--workers", workers),
                                      ("--ray-batch", ray_batch)) if value is not None]
    if not use_ray:
        if given:
            raise click.UsageError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --ray only")
        return None
    if gpus is None:
        raise click.UsageError("--ray needs --gpus N: one worker per GPU, or --gpus 0 for CPU workers (--workers)")
    if gpus and workers is not None and workers != gpus:
        raise click.BadParameter(f"{workers} with --gpus {gpus}: there is one worker per GPU; "
                                 "--workers sets the CPU workers of --gpus 0", param_hint="--workers")
    if overwrite:
        raise click.UsageError("--overwrite does not go with --ray: shards are merged into the store, never over it")
    if address is not None and not address.strip():
        raise click.BadParameter("empty address", param_hint="--address")
    return RayOptions(gpus=gpus, workers=workers, address=address, batch_images=ray_batch or RayOptions.default_batch(gpus))


def read_inputs(inputs: tuple[str, ...], image_column: str | None, id_column: str | None, on_ray: bool) -> Inputs:
    """The INPUTS checked, containers and their columns included, before any store is made or engine started."""
    from splitvlm.encoder.inputs import Inputs

    for value, option in ((image_column, "--image-column"), (id_column, "--id-column")):
        if value is not None and not value.strip():
            raise click.BadParameter("empty column name", param_hint=option)
    sources = Inputs(inputs, image_column, id_column)
    given = [o for o, v in (("--image-column", image_column), ("--id-column", id_column)) if v is not None]
    if given and not sources.tables:
        raise click.UsageError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with .parquet or datasets "
                               "folder inputs only, and none is given")
    if on_ray and sources.containers:
        raise click.UsageError("--ray takes image files, lists and URLs; encode .tar, .parquet and datasets "
                               "inputs without --ray")
    return sources


@click.command("encode")
@engine_options
@click.option("--failures", type=click.Path(dir_okay=False), help="Write one JSON line {path, error} per failed input.")
@click.option("--batch-patches", type=click.IntRange(min=1), default=default("batch_patches"), show_default=True, help="Vision tower budget per step, in patches.")
@click.option("--loader-threads", type=click.IntRange(min=1), default=default("loader_threads"), show_default=True, help="Threads that read and preprocess images.")
@click.option("--full-engine/--mm-encoder-only", default=None,
              help="--full-engine starts vLLM with the language model and a KV cache too; --mm-encoder-only "
                   "(vLLM's name) starts the vision tower alone. Default: the tower alone, except for "
                   "Qwen2.5-VL under the exact profile on a GPU, whose eager tower-only engine gives other "
                   "bits than the decoder's engine.")
@click.option("--overwrite", is_flag=True, help="Recompute entries already in the store (default: skip them, so runs resume).")
@click.option("--stats-json", type=click.Path(dir_okay=False), help="Write the run's figures as JSON.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Encode on Ray (needs pip install 'splitvlm[ray]'): Ray Data tasks read and key the images, "
                   "a pool of encoder-only vLLM workers encodes the new ones, each into its own shard "
                   "(<store>.shards/), merged into the store at the end. A killed run's shards are merged by the next.")
@click.option("--address", default=None, help="With --ray: the Ray cluster to join (default: start one on this machine).")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="With --ray (required): N workers, one per GPU (num_gpus=1 each); 0: CPU workers (--workers).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray --gpus 0: how many CPU workers, each its own vLLM engine [default: 1].")
@click.option("--ray-batch", type=click.IntRange(min=1), default=None, help="With --ray: inputs per keying task and per call to a worker [default: 256 with --gpus N, 32 with --gpus 0].")
@click.option("--image-column", default=None,
              help="Parquet and datasets inputs: the column of image bytes (binary, or a struct with a bytes field "
                   "as datasets writes images) [default: image].")
@click.option("--id-column", default=None,
              help="Parquet and datasets inputs: the column whose values name the rows in references "
                   "(FILE::ID) [default: id, else __key__, else the row number].")
@click.argument("inputs", nargs=-1, required=True)
def command(inputs, failures, batch_patches, loader_threads, full_engine, overwrite, stats_json,
            use_ray, address, gpus, workers, ray_batch, image_column, id_column, **kw) -> None:
    """Encode images with vLLM's own vision tower (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) into the store.

    INPUTS are image files, folders (recursive), globs, .txt lists of paths, .jsonl files
    with an "image" field, URLs (http(s); s3://, gs://... through fsspec), webdataset .tar
    shards, .parquet files and datasets save_to_disk folders. Containers are streamed, never
    unpacked; each image is stored with its reference (shard.tar::000123.jpg, data.parquet::ID;
    docs/jobs.md) as its source. Images already stored are skipped. Bad inputs (a 404, a bad
    member) are reported one line each and the run goes on. Exit status 0 when every input is
    stored, 3 when some failed.

    \b
    On many GPUs (Ray):  splitvlm encode --ray --gpus 2 --model M --store S images/
    gives the store the same entries, byte for byte, as a single-process encode.
    """
    for path, option in ((failures, "--failures"), (stats_json, "--stats-json")):
        if path:
            check_writable(path, option)
    on_ray = ray_options(use_ray, address, gpus, workers, ray_batch, overwrite)
    sources = read_inputs(inputs, image_column, id_column, on_ray is not None)
    cfg = make_config(**kw).replace(failures=failures, batch_patches=batch_patches,
                                    loader_threads=loader_threads, overwrite=overwrite,
                                    encoder_only=None if full_engine is None else not full_engine)
    figures: dict = {}
    if on_ray is None:
        from splitvlm.encoder import Encoder

        stats = Encoder(cfg).encode(sources)
    else:
        from splitvlm.encoder.ray_encode import encode_with_ray

        stats, figures["ray"] = encode_with_ray(cfg, on_ray, inputs)
        merged = figures["ray"]["shards_merged"]
        click.echo(f"ray: {on_ray.pool} {'GPU' if on_ray.gpus else 'CPU'} workers; merged {merged['merged']} shards "
                   f"({merged['copied']} entries) into {cfg.store}", err=True)
    click.echo(stats.summary())
    if stats_json:
        with open(stats_json, "w", encoding="utf-8") as f:
            json.dump({**stats.to_dict(), **figures}, f, indent=2)
    if stats.failed:
        sys.exit(3)  # some inputs failed, the rest stored
