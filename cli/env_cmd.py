"""`splitvlm env` (not yet built)."""

import click


@click.command("env")
def command() -> None:
    """Not yet built."""
    raise click.ClickException("not yet")
