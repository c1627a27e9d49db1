"""`splitvlm verify` (not yet built)."""

import click


@click.command("verify")
def command() -> None:
    """Not yet built."""
    raise click.ClickException("not yet")
