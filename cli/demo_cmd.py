"""`splitvlm demo` (not yet built)."""

import click


@click.command("demo")
def command() -> None:
    """Not yet built."""
    raise click.ClickException("not yet")
