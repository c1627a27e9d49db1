"""`splitvlm make-model` (not yet built)."""

import click


@click.command("make-model")
def command() -> None:
    """Not yet built."""
    raise click.ClickException("not yet")
