"""`splitvlm decode` (not yet built)."""

import click


@click.command("decode")
def command() -> None:
    """Not yet built."""
    raise click.ClickException("not yet")
