"""`splitvlm env`: the versions that decide an output's bytes, and lock files that pin them."""

from __future__ import annotations

import json

import click


@click.command("env")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False),
              help="Also write them as a JSON lock file, for encode, decode and verify --lock.")
@click.option("--json", "as_json", is_flag=True, help="Print them as one JSON object.")
def command(lock_path: str | None, as_json: bool) -> None:
    """Print splitvlm, vLLM, torch, transformers, CUDA and Python versions and the device.

    \b
    With --lock F, write them to F; encode, decode and verify given --lock F then refuse to
    run anywhere else, and decode and verify refuse store entries made under another vLLM,
    torch or device (warn instead with --allow-mismatch).
    """
    from splitvlm.core.lock import current, write_lock

    env = current()
    if as_json:
        click.echo(json.dumps(env, indent=2))
    else:
        width = max(len(name) for name in env)
        for name, value in env.items():
            click.echo(f"{name:<{width}}  {value}")
    if lock_path:
        write_lock(lock_path)
        click.echo(f"wrote {lock_path}", err=as_json)
