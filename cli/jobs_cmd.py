"""`splitvlm jobs`: one job line per image of folders, lists, URLs, .tar shards, Parquet files and datasets folders."""

from __future__ import annotations

import json
import os
import sys

import click

from splitvlm.cli.options import check_writable, output_file


def portable(ref: str, folder: str | None) -> str:
    """A reference as a jobs file in folder names it (relative to it), or absolute for standard output."""
    from splitvlm.core.sources import SEP, is_url

    if is_url(ref):
        return ref
    head, sep, member = ref.partition(SEP)
    head = os.path.abspath(head) if folder is None else os.path.relpath(os.path.abspath(head), folder)
    return head + sep + member


@click.command("jobs")
@click.option("--images", "sources", multiple=True, required=True, metavar="SRC [SRC...]",
              help="Images: files, folders, globs, .txt lists, URLs, .tar shards, .parquet files, datasets folders "
                   "(as `splitvlm encode` takes them). Several may follow one --images.")
@click.option("--prompt", required=True, help="The prompt of every job.")
@click.option("--out", default="-", show_default=True, type=click.Path(dir_okay=False),
              help="The jobs file to write ('-': standard output, with absolute paths). In a file, paths are "
                   "relative to its folder, as decode reads them.")
@click.option("--image-column", default=None, help="Parquet and datasets sources: the image column [default: image].")
@click.option("--id-column", default=None,
              help="Parquet and datasets sources: the id column [default: id, else __key__, else the row number].")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Each job's own max_tokens (optional).")
@click.argument("more", nargs=-1, metavar="")
def command(sources, prompt, out, image_column, id_column, max_tokens, more) -> None:
    """Write a jobs file with one job per image of files, folders, URLs, .tar, .parquet or datasets sources.

    Each line is {"id", "images": [reference], "prompt"} (docs/jobs.md). The id comes from the source: a file's or URL's stem, a tar member's webdataset key
    (000123 for 000123.jpg), a Parquet or datasets row's id column (else its row number); an id
    already taken falls back to the image's reference. Images are listed, not read: decode or
    encode reports a bad one. Then, for example:

    \b
      splitvlm jobs --images shard-0001.tar data.parquet --prompt "Describe the image." --out jobs.jsonl
      splitvlm encode --model M --store S shard-0001.tar data.parquet
      splitvlm decode --model M --store S --jobs jobs.jsonl --out results.jsonl

    Exit status 0, or 3 when some rows could not be named (a repeated or missing id: one line each).
    """
    from splitvlm.cli.encode_cmd import read_inputs
    from splitvlm.core.sources import SourceError, image_id

    check_writable(out, "--out")
    if not prompt.strip():
        raise click.BadParameter("empty prompt", param_hint="--prompt")
    listed = read_inputs(tuple(sources) + tuple(more), image_column, id_column, on_ray=False)
    folder = None if out == "-" else os.path.dirname(os.path.abspath(out))
    ids: set[str] = set()
    written = failed = 0
    with output_file(out) as f:
        for ref, ident in listed.refs():
            if isinstance(ident, SourceError):
                failed += 1
                click.echo(f"skipped {ident}", err=True)
                continue
            name = portable(ref, folder)
            ident = ident or image_id(ref)
            ident = name if ident in ids else ident
            if ident in ids:  # the same image twice
                continue
            ids.add(ident)
            job = {"id": ident, "images": [name], "prompt": prompt}
            if max_tokens:
                job["max_tokens"] = max_tokens
            f.write(json.dumps(job, ensure_ascii=False) + "\n")
            written += 1
    click.echo(f"wrote {written} jobs to {'standard output' if out == '-' else out}", err=True)
    if failed:
        sys.exit(3)
