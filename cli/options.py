"""Options shared by encode, decode and verify, and the Config they build."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

import click

from splitvlm.core.config import IMAGE_LOADERS, Config

if TYPE_CHECKING:
    from splitvlm.encoder import Stats

DTYPES = ("bfloat16", "float16", "float32")


def default(name: str):
    """Config's default for a field: CLI defaults live in one place, the dataclass."""
    return Config.__dataclass_fields__[name].default


def engine_options(f: Callable) -> Callable:
    options = [
        click.option("--model", required=True, help="Local checkpoint directory or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)."),
        click.option("--store", required=True, type=click.Path(), help="The LMDB embedding store (a folder; made when missing)."),
        click.option("--profile", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
                     help="exact: settings under which split == end-to-end holds; fast: vLLM defaults."),
        click.option("--min-pixels", type=click.IntRange(min=1), default=None, help="Override the processor's min_pixels."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="Override the processor's max_pixels."),
        click.option("--image-loader", type=click.Choice(IMAGE_LOADERS), default=default("image_loader"),
                     show_default=True, help="vllm: the pixels vLLM's own image loading gives (end to end); scaled: "
                          "the same, but 16-bit and float grey scaled to 8 bits (rint(v/257)). Part of the key."),
        click.option("--dtype", type=click.Choice(DTYPES), default=default("dtype"), show_default=True, help="Model dtype."),
        click.option("--max-model-len", type=click.IntRange(min=1), default=None, help="vLLM max_model_len (default: the model's)."),
        click.option("--gpu-memory-utilization", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                     help="vLLM memory share (default 0.3 CPU, 0.85 GPU)."),
        click.option("--kv-cache-memory-bytes", type=click.IntRange(min=1), default=None,
                     help="vLLM kv_cache_memory_bytes: a KV cache of this size instead of one sized from free memory "
                          "(use it when engines share a GPU; --gpu-memory-utilization is then ignored)."),
        click.option("--enforce-eager/--cuda-graphs", default=None, help="Eager mode or CUDA graphs (default: eager on the CPU only)."),
        click.option("--lock", type=click.Path(dir_okay=False), default=None,
                     help="A lock file from `splitvlm env --lock`: refuse to run under another environment, "
                          "or on store entries made under one."),
        click.option("--allow-mismatch", is_flag=True,
                     help="Use entries made under another vLLM version or device (or, with --lock, warn)."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_config(**kw) -> Config:
    """The Config of the shared options; contradictory values are refused before any engine starts."""
    if kw["min_pixels"] and kw["max_pixels"] and kw["min_pixels"] > kw["max_pixels"]:
        raise click.BadParameter(f"--min-pixels {kw['min_pixels']} is larger than --max-pixels {kw['max_pixels']}",
                                 param_hint="--min-pixels")
    return Config(
        model=kw["model"], store=kw["store"], profile=kw["profile"],
        min_pixels=kw["min_pixels"], max_pixels=kw["max_pixels"], image_loader=kw["image_loader"], dtype=kw["dtype"],
        max_model_len=kw["max_model_len"], gpu_memory_utilization=kw["gpu_memory_utilization"],
        kv_cache_memory_bytes=kw["kv_cache_memory_bytes"],
        enforce_eager=kw["enforce_eager"], allow_mismatch=kw["allow_mismatch"], lock=kw["lock"],
        show_progress=not kw["no_progress"],
    )


def missing_encoder(cfg: Config, engine: Callable[[], object]) -> Callable[[list[str]], Stats]:
    """A Decoder's encode_missing: the Encoder in the engine that engine() returns (the decoder's own)."""

    def encode(paths: list[str]) -> Stats:
        from splitvlm.encoder import Encoder

        return Encoder(cfg, engine=engine()).encode(paths)

    return encode


def check_writable(path: str, option: str) -> None:
    """Refuse an output path that cannot be written, before any work is done ('-' is standard output)."""
    if path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise click.BadParameter(f"{path} is a folder", param_hint=option)
    if not os.path.isdir(folder):
        raise click.BadParameter(f"{path}: folder {folder} does not exist", param_hint=option)
    target = path if os.path.exists(path) else folder
    if not os.access(target, os.W_OK):
        raise click.BadParameter(f"{path}: not writable", param_hint=option)


@contextlib.contextmanager
def output_file(path: str) -> Iterator[TextIO]:
    """path opened for writing, or standard output for '-'."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8") as f:
        yield f
