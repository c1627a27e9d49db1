"""Options shared by encode, decode and verify, and the Config they build."""

from __future__ import annotations

from collections.abc import Callable

import click

from splitvlm.core.config import Config


def engine_options(f: Callable) -> Callable:
    options = [
        click.option("--model", required=True, help="Local checkpoint directory or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)."),
        click.option("--store", required=True, type=click.Path(), help="The LMDB embedding store (a folder; made when missing)."),
        click.option("--profile", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
                     help="exact: settings under which split == end-to-end holds; fast: vLLM defaults."),
        click.option("--min-pixels", type=int, default=None, help="Override the processor's min_pixels."),
        click.option("--max-pixels", type=int, default=None, help="Override the processor's max_pixels."),
        click.option("--dtype", default="bfloat16", show_default=True, help="Model dtype."),
        click.option("--max-model-len", type=int, default=None, help="vLLM max_model_len (default: the model's)."),
        click.option("--gpu-memory-utilization", type=float, default=None, help="vLLM memory share (default 0.3 CPU, 0.85 GPU)."),
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
    return Config(
        model=kw["model"], store=kw["store"], profile=kw["profile"],
        min_pixels=kw["min_pixels"], max_pixels=kw["max_pixels"], dtype=kw["dtype"],
        max_model_len=kw["max_model_len"], gpu_memory_utilization=kw["gpu_memory_utilization"],
        kv_cache_memory_bytes=kw["kv_cache_memory_bytes"],
        enforce_eager=kw["enforce_eager"], allow_mismatch=kw["allow_mismatch"], lock=kw["lock"],
        show_progress=not kw["no_progress"],
    )
