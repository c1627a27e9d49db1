"""`splitvlm serve`: vLLM's OpenAI-compatible server, answering stored images from the store."""

from __future__ import annotations

import os
import sys

import click

from splitvlm.cli.options import engine_options, make_config
from splitvlm.core.errors import SplitVLMError


@click.command("serve")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--store-new", is_flag=True,
              help="Also store the embeddings of images not in the store, as `splitvlm encode` would.")
@click.option("--allowed-media-path", type=click.Path(file_okay=False),
              help="file:// image URLs are read only from under this folder (none without it).")
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on /v1 requests.")
@click.argument("vllm_options", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_OPTIONS...]")
def command(host, port, store_new, allowed_media_path, api_key, vllm_options, **kw) -> None:
    """Serve /v1/chat/completions with vLLM's own OpenAI server; images in the store are answered
    from it, without the vision tower, and give the bytes `splitvlm decode` gives.

    \b
    Images come as vLLM takes them: image_url with a data: URL (base64), file:// under
    --allowed-media-path, or http(s). An image not in the store runs through the tower
    (--store-new also stores it). /metrics counts splitvlm_store_hits_total (tower calls
    avoided), splitvlm_store_misses_total, splitvlm_tower_images_total and
    splitvlm_stored_new_total. Options after `--` go to vLLM's server unchanged, except
    those that decide the output's bytes (the profile's, the model, dtype, chat template).
    """
    from splitvlm.serve.server import ServeOptions, UsageError, serve
    from splitvlm.store import EmbeddingStore

    cfg = make_config(**kw).replace(show_progress=False)
    if allowed_media_path and not os.path.isdir(allowed_media_path):
        raise click.BadParameter(f"{allowed_media_path}: no such folder", param_hint="--allowed-media-path")
    if not store_new:
        try:
            with EmbeddingStore(cfg.store, readonly=True):
                pass
        except SplitVLMError as exc:
            raise click.BadParameter(f"{exc} (encode into it first, or pass --store-new)", param_hint="--store") from None
    opts = ServeOptions(cfg, host=host, port=port, store_new=store_new, allowed_media_path=allowed_media_path,
                        api_key=api_key, extra=list(vllm_options))
    try:
        serve(opts)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(0)
