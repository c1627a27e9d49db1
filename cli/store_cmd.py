"""`splitvlm store`: inspect and maintain an embedding store (stats, ls, check, get, export, rm, compact, merge)."""

from __future__ import annotations

import json
import os
import sys
from typing import IO

import click

store_option = click.option(
    "--store", "store_path", required=True, type=click.Path(file_okay=False), help="The store folder."
)


def _open(path: str, readonly: bool = True):
    """The store, read-only unless asked: reading needs no write access to its folder or files."""
    from splitvlm.store import EmbeddingStore, StoreError

    if not readonly and not os.path.exists(os.path.join(path, "data.mdb")):  # rm makes no store
        raise StoreError(f"{os.path.realpath(path)}: no store there")
    return EmbeddingStore(path, readonly=readonly)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="entry", file=sys.stderr, disable=None, leave=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


@click.group("store")
def command() -> None:
    """Inspect and maintain an embedding store."""


@command.command("stats")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
def stats_cmd(store_path: str, as_json: bool) -> None:
    """Entries, bytes, models and dtypes of a store."""
    with _open(store_path) as store, _progress(len(store), "reading headers") as bar:
        stats = store.stats(progress=bar.update)
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    click.echo(f"{stats['entries']} entries, {_size(stats['bytes'])} of values, {_size(stats['file_bytes'])} on disk")
    for title, name in (("models", "models"), ("dtypes", "dtypes"), ("profiles", "profiles"), ("hidden sizes", "hidden_sizes")):
        counts = stats[name]
        if counts:
            click.echo(f"{title}: " + ", ".join(f"{k or '(none)'} ({n})" for k, n in sorted(counts.items())))
    if stats["unreadable_headers"]:
        click.echo(f"unreadable headers: {stats['unreadable_headers']} (run `splitvlm store check`)")
    click.echo(f"{stats['results']} cached results")
    if not stats["locked"]:
        click.echo("note: read without LMDB's lock (lock.mdb not writable here); a concurrent writer could upset these counts", err=True)


@command.command("ls")
@store_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of columns.")
def ls_cmd(store_path: str, as_json: bool) -> None:
    """List the entries: key, tokens x hidden, dtype, model, source."""
    with _open(store_path) as store:
        for info in store.headers():
            if as_json:
                click.echo(json.dumps(info, sort_keys=True))
            elif "error" in info:
                click.echo(f"{info['key']}  {info['error']}")
            else:
                shape = f"{info['n_tokens']}x{info['hidden_size']}"
                click.echo(f"{info['key']}  {shape:>10}  {info['dtype']:<8}  {info['model_id']}  {info['source']}")


@command.command("check")
@store_option
@click.option("--hidden-size", type=int, help="Also check against a model with this hidden size ...")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="... this dtype ...")
@click.option("--merge-size", type=int, help="... and this spatial merge size (all three together).")
def check_cmd(store_path: str, hidden_size: int | None, dtype: str | None, merge_size: int | None) -> None:
    """Read and check every entry and every cached decode result; print each bad one; exit 1 if any is bad."""
    from splitvlm.store import Expect
    from splitvlm.store.results import check_results  # not decoder.cache: check runs without torch
    from splitvlm.store.walk import old_keys

    given = [v is not None for v in (hidden_size, dtype, merge_size)]
    if any(given) and not all(given):
        raise click.UsageError("--hidden-size, --dtype and --merge-size go together")
    expect = Expect(hidden_size, dtype, merge_size) if all(given) else None
    checked = bad = 0
    with _open(store_path) as store, _progress(len(store), "checking") as bar:
        for _, problem in store.check(expect, progress=bar.update):
            checked += 1
            if problem is not None:
                bad += 1
                bar.clear()
                click.echo(problem)
        results, bad_results = check_results(store)
        old = old_keys(store)
    for key in bad_results:
        click.echo(f"cached result {key}: changed after it was written (checksum mismatch or unknown format); "
                   "`store rm --results` clears the cache")
    if old:
        click.echo(f"{old} entries have keys of an older version, which this splitvlm never finds: run "
                   f"`splitvlm store rekey --model MODEL --store {store_path}` to move them")
    click.echo(f"{checked} entries checked, {bad} bad; {results} cached results checked, {len(bad_results)} bad")
    if bad or bad_results or old:
        sys.exit(1)


@command.command("rekey")
@click.option("--model", required=True, help="The model the entries were encoded with (any copy of it).")
@store_option
@click.option("--profile", type=click.Choice(["exact", "fast"]), default="exact", show_default=True)
@click.option("--min-pixels", type=click.IntRange(min=1), default=None, help="As given to encode, if it was.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="As given to encode, if it was.")
@click.option("--image-loader", type=click.Choice(["vllm", "scaled"]), default="vllm", show_default=True,
              help="The loader to move entries of the older image loader to (as encode's --image-loader).")
def rekey_cmd(model: str, store_path: str, profile: str, min_pixels: int | None, max_pixels: int | None,
              image_loader: str) -> None:
    """Move entries made under older keys (splitvlm 0.1 put the model's path in the key) or by the
    older image loader to this version's keys. Each entry's source file is re-read and must still give
    its old key; an older loader's entry moves only if its image decodes to the same pixels under
    --image-loader (else it needs re-encoding). Entries not moved are named and left as they are. Resumable."""
    from splitvlm.core.config import Config
    from splitvlm.encoder.rekey import rekey

    stats = rekey(Config(model=model, store=store_path, profile=profile, min_pixels=min_pixels, max_pixels=max_pixels,
                         image_loader=image_loader))
    for line in stats.failed:
        click.echo(line, err=True)
    click.echo(stats.summary())
    if stats.failed:
        sys.exit(3)


@command.command("get")
@store_option
@click.argument("key")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .safetensors file to write.")
def get_cmd(store_path: str, key: str, out: str) -> None:
    """Write one entry, checked, to a safetensors file (tensors and metadata as stored)."""
    with _open(store_path) as store:
        blob = store.blob(key)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, out)
    except OSError as exc:
        raise click.ClickException(f"{out}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"wrote {out} ({_size(len(blob))})")


def _chosen_keys(key_args: tuple[str, ...], keys_file: IO[str] | None) -> list[str] | None:
    """The keys of --keys (comma-separated, repeatable) then --keys-file (one a line, # comments); None: all."""
    if not key_args and keys_file is None:
        return None
    keys = [k for arg in key_args for k in arg.split(",")]
    keys += [line for line in keys_file or () if not line.lstrip().startswith("#")]
    return [k.strip() for k in keys if k.strip()]


@command.command("export")
@store_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The folder to write (made if missing).")
@click.option("--format", "fmt", required=True, type=click.Choice(["npy", "safetensors", "parquet"]),
              help="npy: <key>.npy per entry + index.jsonl; safetensors: <key>.safetensors per entry + index.jsonl; "
                   "parquet: one embeddings.parquet (needs pyarrow).")
@click.option("--dtype", type=click.Choice(["float32", "native"]), default="float32", show_default=True,
              help="float32: bfloat16/float16 widened exactly, readable by numpy and safetensors.numpy. native "
                   "(safetensors only): each entry's blob as stored; bfloat16 files then only torch reads.")
@click.option("--keys", "key_args", multiple=True, metavar="K[,K...]", help="Export only these keys (repeatable).")
@click.option("--keys-file", type=click.File("r", encoding="utf-8"), help="Export only the keys in this file, one a line ('-': stdin).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out, replacing files of the same names.")
def export_cmd(store_path: str, out: str, fmt: str, dtype: str, key_args: tuple[str, ...],
               keys_file: IO[str] | None, overwrite: bool) -> None:
    """Write entries (all, or --keys), each read with every check of `get`, as files other tools read.

    A bad or unknown key is reported on one line on stderr and skipped (exit 3 at the end). Each
    file is written under a temporary name and renamed into place; a non-empty --out is refused
    without --overwrite. Ends with one line: exported N, bad M, bytes written.
    """
    from splitvlm.store import export_store

    if dtype == "native" and fmt != "safetensors":
        raise click.UsageError(f"--dtype native goes with --format safetensors only ({fmt} holds float32: numpy has no bfloat16)")
    keys = _chosen_keys(key_args, keys_file)
    with _open(store_path) as store, _progress(len(store) if keys is None else len(keys), "exporting") as bar:

        def report(line: str) -> None:
            bar.clear()
            click.echo(line, err=True)

        done = export_store(store, out, fmt, dtype=dtype, keys=keys, overwrite=overwrite, report=report, progress=bar.update)
    click.echo(f"exported {done.entries}, bad {done.bad}, {_size(done.bytes)} written to {out} ({fmt}, {dtype})")
    if done.exit_status:
        sys.exit(done.exit_status)


@command.command("rm")
@store_option
@click.argument("keys", nargs=-1)
@click.option("--results", "clear_results", is_flag=True, help="Remove every cached decode result (see decode --cache).")
def rm_cmd(store_path: str, keys: tuple[str, ...], clear_results: bool) -> None:
    """Remove entries (in one transaction), or the cached results; exit 1 if any key was not there."""
    if not keys and not clear_results:
        raise click.UsageError("give the keys to remove, or --results")
    absent: list[str] = []
    with _open(store_path, readonly=False) as store:
        if keys:
            absent = store.missing(keys)
            removed = store.delete(keys)
        if clear_results:
            from splitvlm.store.results import clear_results as clear

            cleared = clear(store)
    for key in absent:
        click.echo(f"{key}: missing", err=True)
    if keys:
        click.echo(f"removed {removed} entries")
    if clear_results:
        click.echo(f"removed {cleared} cached results")
    if absent:
        sys.exit(1)


@command.command("compact")
@store_option
@click.option("--into", type=click.Path(file_okay=False), help="Write the compacted copy to this new folder; the store stays as it is.")
def compact_cmd(store_path: str, into: str | None) -> None:
    """Give the space of removed entries back to the disk (LMDB's compacting copy).

    In place, the copy replaces the store only once it is complete and synced; refused while
    another process has the store open for writing (see docs/store-format.md).
    """
    from splitvlm.store import compact_store

    done = compact_store(store_path, into)
    if done.readers:
        pids = ", ".join(map(str, done.readers))
        click.echo(f"note: process {pids} still reads the old store, and sees no later change until it opens the store again", err=True)
    click.echo(f"{done.path}: {_size(done.before)} before, {_size(done.after)} after "
               f"({done.entries} entries, {done.results} cached results)")


@command.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--into", required=True, type=click.Path(file_okay=False), help="The store to merge into (made if missing).")
@click.option("--batch", default=256, show_default=True, type=click.IntRange(min=1), help="Entries per write transaction.")
def merge_cmd(sources: tuple[str, ...], into: str, batch: int) -> None:
    """Copy the entries and cached results of each SOURCE store into --into, checked, never overwriting.

    A key already there with other bytes is a conflict: reported, left as it is, exit 1 at the end.
    A source entry that fails its checks is reported and skipped: exit 3 at the end. A merge that
    was stopped can be run again: what it copied is found identical and skipped.
    """
    from splitvlm.store import EmbeddingStore, merge_stores

    total = 0
    for path in sources:
        if os.path.isfile(os.path.join(path, "data.mdb")):  # merge_stores names a missing one
            with EmbeddingStore(path, readonly=True) as store:
                total += len(store)
    with _progress(total, "merging") as bar:

        def report(line: str) -> None:
            bar.clear()
            click.echo(line, err=True)

        merged = merge_stores(sources, into, batch=batch, report=report, progress=bar.update)
    for name, tally in (("entries", merged.entries), ("cached results", merged.results)):
        bad = f", {tally.bad} bad" if name == "entries" else ""
        click.echo(f"{name}: {tally.copied} copied, {tally.identical} identical skipped, {tally.conflicts} conflicts{bad}")
    if merged.exit_status:
        sys.exit(merged.exit_status)
