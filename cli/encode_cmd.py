"""`splitvlm encode` (not yet built)."""

import click


@click.command("encode")
def command() -> None:
    """Not yet built."""
    raise click.ClickException("not yet")
